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
from lrdaccel.cli._training import saved_layers
from lrdaccel.planning import Plan
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.contestants import BuildContext
from lrdaccel.racing.lrd_variant import LRD_DEFAULTS, build_lrd, check_lrd_options
from lrdaccel.tasks.classifier import classifier_plan, make_classifier
from lrdaccel.tasks.data import RaceData
from lrdaccel.tasks.registry import MAX_LENGTH, check_task_model, load_task, task_kind
from lrdaccel.tasks.saved import CLASSIFIER_NAME, load_classifier, read_classifier_info, save_classifier
from lrdaccel.training.config import FinetuneConfig

# A text task takes the race's optimizer unless the user says otherwise (SGD at 0.01 would wreck a
# pretrained transformer): AdamW, and these fields at RaceConfig's values. The rest stays
# finetune's own, unlike the race: a cosine schedule without warm-up, the embeddings trained.
TEXT_DEFAULTS = {"optimizer": "adamw", **{f.name: f.default for f in fields(RaceConfig)
                                           if f.name in ("lr", "weight_decay", "batch_size", "eval_batch_size")}}


def check_task_args(args: argparse.Namespace) -> None:
    """Everything about a --task run that can be checked before the model or the data load.

    Raises:
        ValueError: a factory model, an unknown task or one the model cannot take, a bad --plan
            file, --min-rank (the race's planning has no minimum rank), --max-length for images,
            --distill without --from and --ratio / --plan, a --from DIR that is no classifier (or
            is decomposed already where --ratio / --plan would decompose it).
    """
    if ":" in args.model:
        raise ValueError(f"--task needs a zoo model (e.g. minilm), not the factory {args.model!r}: the task's "
                         f"data are prepared for a zoo model's inputs")
    check_task_model(args.task, zoo.get(args.model))
    if args.no_standardize:
        raise ValueError("--no-standardize applies to --dataset runs; a --task is prepared for its model")
    if getattr(args, "min_rank", None) is not None:
        raise ValueError("--min-rank applies to --dataset runs; with --task, --ratio plans as the race's lrd variant")
    if args.max_length is not None and task_kind(args.task) != "text":
        raise ValueError(f"--max-length {args.max_length} applies to a text --task, not to {args.task}")
    compress = args.ratio is not None or bool(args.plan)
    if args.distill and not (args.source and compress):
        raise ValueError("--distill with --task distils from the classifier before decomposition: give --from DIR "
                         "(a classifier trained by `finetune --task`) and --ratio or --plan (decompose it here)")
    if compress:
        check_lrd_options(lrd_options(args))  # the ratio, and the plan file read
    if args.source:
        _check_source(args.source, compress)


def _check_source(source: str, compress: bool) -> None:
    """--from DIR is a saved classifier, not decomposed yet where --ratio or --plan decomposes it."""
    if read_classifier_info(source) is None:
        raise ValueError(f"--from {source}: no {CLASSIFIER_NAME}: with --task, give a classifier saved by "
                         f"`lrdaccel finetune --task ... -o DIR`")
    layers = saved_layers(source)
    if compress and layers:
        raise ValueError(f"--from {source} is decomposed already ({layers} layers): fine-tune it without "
                         f"--ratio / --plan, or give the classifier before decomposition")


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
    if args.plan:  # a plan made for the zoo model (`lrdaccel plan --model minilm`) names its layers
        options["plan"] = classifier_plan(Plan.load(args.plan), classifier)
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
