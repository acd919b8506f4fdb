"""`lrdaccel finetune`: fine-tune a decomposed model on a dataset with sequential freezing.

The model is a zoo name or `package.module:factory` (with --weights), either decomposed here
(--ratio, or --plan FILE) or rebuilt from a directory written by `lrdaccel compress` (--from). With
--dataset it must take the dataset's [N, 1, 28, 28] images (the zoo's fmnist-cnn, the default, and
fmnist-vit do). Run it under `torchrun --nproc_per_node=N $(which lrdaccel) finetune ...` for
data-parallel training.

With --task (a race task: wordnet-supersense, or your own JSONL file) the zoo model becomes a
classifier for the task's classes (a new head, as `lrdaccel race` makes it), is compressed with
--ratio / --plan as the race's `lrd` variant compresses it (whitened SVD calibrated on the task's
training texts, the head kept whole), trains on the task's training split and is scored on its
eval split; -o saves it for `lrd.load` (plus classifier.json) and `lrdaccel export --from`. With
--task, --from DIR continues a classifier saved so, and with --ratio / --plan decomposes it first
(--distill then distils from it as it was):

    lrdaccel finetune --model minilm --task my.jsonl --ratio 2 --epochs 3 -o my_model/
    lrdaccel export --model minilm --from my_model/ -o my_model.onnx
    lrdaccel finetune --model minilm --task my.jsonl -o full/ && lrdaccel finetune --model minilm \
        --task my.jsonl --from full/ --ratio 2 --distill -o small/

A text task trains with the race's defaults (AdamW, lr 5e-5, weight decay 0.01, batch 32) where
the options are not given. Without --ratio, --plan or --from there is no freezing by default.
"""

from __future__ import annotations

import argparse
import copy

from lrdaccel import data
from lrdaccel.cli._common import add_model_args, check_outputs, load_model, positive_int, require_data
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.cli._finetune_task import check_task_args, save_task_run, task_config, task_model
from lrdaccel.cli._training import (HISTORY_NAME, add_source_args, check_amp, decompose_from_args, save_history,
                                    save_run, saved_layers)
from lrdaccel.training.config import AMP_DTYPES, LR_SCHEDULES, OPTIMIZERS, FinetuneConfig
from lrdaccel.training.distributed import is_main_process, process_group
from lrdaccel.training.freezer import SCHEDULES
from lrdaccel.planning import PlanConfig
from lrdaccel.tasks.registry import TASKS
from lrdaccel.training.loop import finetune

ORDER = 50  # place in `lrdaccel --help`: the pipeline's order

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a decomposed model with sequential freezing (DDP under torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(model="fmnist-cnn")  # the datasets here are 1x28x28 images
    add_source_args(parser, plan=True)

    run = parser.add_argument_group("data and training")
    run.add_argument("--dataset", choices=data.NAMES,
                     help=f"dataset (default fashion-mnist unless --task). Needs: {data.needs_text()}")
    run.add_argument("--task", help=f"instead of --dataset, a race task for a zoo model: {', '.join(TASKS)}, or a "
                                    "JSONL file with one {\"text\": ..., \"label\": ..., \"split\": \"train\"|\"eval\"} "
                                    "per line (see `lrdaccel race --help`); the model gets a new head for its classes")
    run.add_argument("--max-length", type=positive_int,
                     help="with a text --task: tokens kept per text (default 128)")
    run.add_argument("--train-limit", type=positive_int, help="use only the first N training items")
    run.add_argument("--test-limit", type=positive_int, help="use only the first N test (eval) items")
    run.add_argument("--no-standardize", action="store_true",
                     help="feed images in [0, 1] as they are (default: standardise by the training set's mean and std)")
    add_config_args(run, FinetuneConfig, ("epochs", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule",
                                          "batch_size", "eval_batch_size", "seed", "amp", "amp_dtype"),
                    flags={"batch_size": "--train-batch-size"},
                    choices={"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "amp_dtype": AMP_DTYPES},
                    notes={"batch_size": "--batch-size is the example input's"})
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    freeze = parser.add_argument_group("sequential freezing")
    add_config_args(freeze, FinetuneConfig, ("schedule", "every_epochs", "every_steps", "freeze_undecomposed"),
                    flags={"schedule": "--freeze"}, choices={"schedule": SCHEDULES})

    distill = parser.add_argument_group("knowledge distillation")
    distill.add_argument("--distill", action="store_true",
                         help="distil from the model before decomposition (KL on softened logits + task loss)")
    add_config_args(distill, FinetuneConfig, ("alpha", "temperature"))

    state = parser.add_argument_group("checkpoints and output")
    add_config_args(state, FinetuneConfig, ("checkpoint_dir", "checkpoint_every_steps", "resume", "max_steps"))
    state.add_argument("--output", "-o", help=f"save the fine-tuned model here (lrd.save) with {HISTORY_NAME}")
    return parser


def run(args: argparse.Namespace) -> int:
    options = given(args, FinetuneConfig)
    check_amp(options)
    if args.task and args.dataset:
        raise ValueError(f"give --task or --dataset, not both (--task {args.task}, --dataset {args.dataset})")
    if args.task:
        options = task_config(options, args.task)
    # --from a classifier fine-tuned whole (finetune --task) has nothing decomposed either
    decomposed = bool(args.ratio is not None or args.plan or (args.source and saved_layers(args.source)))
    if "schedule" not in options and not decomposed:
        options["schedule"] = None  # nothing decomposed, nothing to rotate: a plain fine-tune
    config = FinetuneConfig(**options)
    check_outputs(dirs={"--output": args.output, "--checkpoint-dir": config.checkpoint_dir})
    ratio = args.ratio is not None
    if args.source and (ratio or args.plan) and not args.task:  # with --task, --from a classifier to decompose
        raise ValueError(f"give --from DIR or {'--ratio' if ratio else '--plan'}, not both")
    if args.plan and (ratio or "min_rank" in given(args, PlanConfig)):
        raise ValueError(f"--plan {args.plan} gives the ranks: leave out {'--ratio' if ratio else '--min-rank'}")
    if config.schedule is not None and not decomposed:
        raise ValueError(f"--freeze {config.schedule} needs a decomposed model: give --ratio R or --plan FILE (decompose "
                         f"here) or --from DIR (a model saved by `lrdaccel compress`), or --freeze none")
    if args.task:
        return _run_task(args, config)
    if args.max_length is not None:
        raise ValueError(f"--max-length {args.max_length} applies to a text --task, not to --dataset")
    args.dataset = args.dataset or "fashion-mnist"
    require_data("--dataset", args.dataset)  # before any work
    if ":" in args.model and args.input_shape is None:
        args.input_shape = (1, 28, 28)
    model, _ = load_model(args)
    teacher = copy.deepcopy(model).eval() if args.distill else None
    decompose_from_args(model, args)
    if args.no_standardize:
        train, test = (data.load(args.dataset, split, limit) for split, limit in
                       (("train", args.train_limit), ("test", args.test_limit)))
    else:
        train, test = data.standardized_splits(args.dataset, args.train_limit, args.test_limit)
    # One process group for the run and the save after it, so that only rank 0 writes.
    with process_group():
        history = finetune(model, train, test, config, teacher=teacher, progress=not args.no_progress)
        if is_main_process():
            print(history)
        if args.output:
            save_run(model, history, args.output)
    return 0


def _run_task(args: argparse.Namespace, config: FinetuneConfig) -> int:
    check_task_args(args)  # before any work
    model, teacher, task_data, head = task_model(args, config)
    with process_group():
        history = finetune(model, task_data.split("train"), task_data.split("eval"), config, teacher=teacher,
                           progress=not args.no_progress)
        if is_main_process():
            print(history)
        if args.output:
            save_task_run(model, task_data, head, args)
            save_history(history, args.output)
    return 0
