"""`lrdaccel finetune --task`: fine-tune a zoo model as a classifier for one of the race's tasks
(a name of lrdaccel.tasks.TASKS, or a user's JSONL file), compressed first as the race's `lrd`
variant compresses it, and saved so that `lrd.load` (with the head) and `lrdaccel export` reload it.

The pieces are the race's own: `load_task` prepares the data, `make_classifier` adds the head,
`build_lrd` plans and decomposes (whitened SVD calibrated on the task's training batches, the head
kept whole), `lrd.finetune` trains, `save_classifier` writes it.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import fields

from torch import nn

from lrdaccel import zoo
from lrdaccel.cli._common import load_model
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.contestants import BuildContext
from lrdaccel.racing.lrd_variant import LRD_DEFAULTS, build_lrd, check_lrd_options
from lrdaccel.tasks.classifier import make_classifier
from lrdaccel.tasks.data import RaceData
from lrdaccel.tasks.registry import MAX_LENGTH, check_task_model, load_task, task_kind
from lrdaccel.tasks.saved import load_classifier, save_classifier
from lrdaccel.training.config import FinetuneConfig

# A text task trains as the race trains it unless the user says otherwise (SGD at 0.01 would wreck
# a pretrained transformer): these FinetuneConfig fields take RaceConfig's values.
TEXT_DEFAULTS = {"optimizer": "adamw", **{f.name: f.default for f in fields(RaceConfig)
                                           if f.name in ("lr", "weight_decay", "batch_size", "eval_batch_size")}}


def check_task_args(args: argparse.Namespace) -> None:
    """Everything about a --task run that can be checked before the model or the data load.

    Raises:
        ValueError: a factory model, an unknown task or one the model cannot take, a bad --plan
            file, --min-rank (the race's planning has no minimum rank), --distill without --from.
    """
    if ":" in args.model:
        raise ValueError(f"--task needs a zoo model (e.g. minilm), not the factory {args.model!r}: the task's "
                         f"data are prepared for a zoo model's inputs")
    check_task_model(args.task, zoo.get(args.model))
    if args.no_standardize:
        raise ValueError("--no-standardize applies to --dataset runs; a --task is prepared for its model")
    if getattr(args, "min_rank", None) is not None:
        raise ValueError("--min-rank applies to --dataset runs; with --task, --ratio plans as the race's lrd variant")
    if args.distill and not args.source:
        raise ValueError("--distill with --task needs --from DIR (a trained classifier): the model before "
                         "decomposition would be the pretrained model with an untrained head")
    if args.ratio is not None or args.plan:
        check_lrd_options(lrd_options(args))  # the ratio, and the plan file read


def max_length(args: argparse.Namespace) -> int:
    """--max-length, or load_task's default."""
    return args.max_length or MAX_LENGTH


def lrd_options(args: argparse.Namespace) -> dict:
    """The race's `lrd` variant's options: its defaults, with --ratio or --plan."""
    return {**LRD_DEFAULTS, **({"ratio": args.ratio} if args.ratio is not None else {}), "plan": args.plan or ""}


def task_config(options: dict, task: str) -> dict:
    """FinetuneConfig's fields for a --task run: the race's training defaults for a text task,
    where the user gave no value."""
    return {**TEXT_DEFAULTS, **options} if task_kind(task) == "text" else options


def task_model(args: argparse.Namespace, config: FinetuneConfig) -> tuple[nn.Module, nn.Module | None, RaceData,
                                                                           list[str]]:
    """(the classifier to train, the teacher or None, the task's data, the head's module names)."""
    spec = zoo.get(args.model)
    data = load_task(args.task, spec, max_length=max_length(args), train_limit=args.train_limit,
                     eval_limit=args.test_limit)
    base, _ = load_model(args)
    example, _ = data.batch("train", list(range(min(4, data.size("train")))))
    if args.source:
        classifier, info = load_classifier(args.source, base, example)
        if info["classes"] != data.classes:
            raise ValueError(f"--from {args.source}: a classifier for classes {info['classes']}, but task "
                             f"{args.task} has {data.classes}")
        head = list(info.get("head", []))
    else:
        classifier, head = make_classifier(base, example, len(data.classes), seed=config.seed)
    teacher = copy.deepcopy(classifier).eval() if args.distill else None
    if args.ratio is not None or args.plan:
        _compress(classifier, data, head, args, config)
    return classifier, teacher, data, head


def _compress(classifier: nn.Module, data: RaceData, head: list[str], args: argparse.Namespace,
              config: FinetuneConfig) -> None:
    """The race's `lrd` variant with its defaults, at --ratio or by --plan, calibrated on the first
    training batches of the run's seed."""
    options = lrd_options(args)
    batches = data.shuffled_batches(config.batch_size, options["calibration"], config.seed)
    inputs, labels = zip(*(data.batch("train", indices) for indices in batches))
    context = BuildContext(list(inputs), list(labels), inputs[0], head, steps=0)
    built = build_lrd(options, classifier, context)
    how = f"by {args.plan}" if args.plan else f"at ratio {options['ratio']}"
    print(f"decomposed {built.notes['decomposed_layers']} layers {how} ({options['method']}, calibrated on "
          f"{len(batches)} training batches)")


def save_task_run(model: nn.Module, data: RaceData, head: list[str], args: argparse.Namespace) -> None:
    """`save_classifier` with what rebuilds the classifier: the zoo model, the task, max_length."""
    save_classifier(model, args.output, classes=data.classes, head=head, model=args.model, task=args.task,
                    max_length=max_length(args))
