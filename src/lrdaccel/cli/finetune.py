"""`lrdaccel finetune`: fine-tune a decomposed model on a dataset with sequential freezing.

The model is a zoo name or `package.module:factory` (with --weights), either decomposed here
(--ratio) or rebuilt from a directory written by `lrdaccel compress` (--from). It must take the
dataset's [N, 1, 28, 28] images (the zoo's fmnist-cnn, the default, and fmnist-vit do). Run it under
`torchrun --nproc_per_node=N $(which lrdaccel) finetune ...` for data-parallel training.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.cli._common import add_model_args, load_model
from lrdaccel.freezing import SCHEDULES
from lrdaccel.train import FinetuneConfig, finetune, init_distributed

HISTORY_NAME = "history.json"
DEFAULTS = FinetuneConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a decomposed model with sequential freezing (DDP under torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(model="fmnist-cnn")  # the datasets here are 1x28x28 images
    source = parser.add_argument_group("decomposition")
    source.add_argument("--from", dest="source", metavar="DIR",
                        help="a decomposed model saved by `lrdaccel compress -o DIR`, rebuilt on --model")
    source.add_argument("--ratio", type=float,
                        help="decompose --model here at this per-layer compression ratio (instead of --from)")
    source.add_argument("--min-rank", type=int, default=8,
                        help="with --ratio: keep a layer whose ratio rank falls below this (default 8)")

    run = parser.add_argument_group("data and training")
    run.add_argument("--dataset", default="fashion-mnist", choices=data.NAMES, help="dataset (default fashion-mnist)")
    run.add_argument("--train-limit", type=_positive_int, help="use only the first N training images")
    run.add_argument("--test-limit", type=_positive_int, help="use only the first N test images")
    run.add_argument("--no-standardize", action="store_true",
                     help="feed images in [0, 1] as they are (default: standardise by the training set's mean and std)")
    run.add_argument("--epochs", type=_positive_int, default=DEFAULTS.epochs, help=f"epochs (default {DEFAULTS.epochs})")
    run.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"peak learning rate (default {DEFAULTS.lr})")
    run.add_argument("--optimizer", choices=("sgd", "adamw"), default=DEFAULTS.optimizer,
                     help="sgd (with --momentum) or adamw (default sgd)")
    run.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="SGD momentum (default 0.9)")
    run.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="weight decay (default 0)")
    run.add_argument("--lr-schedule", choices=("cosine", "constant"), default=DEFAULTS.lr_schedule,
                     help="cosine decay to zero over the run, per step, or constant (default cosine)")
    run.add_argument("--train-batch-size", type=_positive_int, default=DEFAULTS.batch_size,
                     help=f"training batch per process (default {DEFAULTS.batch_size}; --batch-size is the example "
                          f"input's)")
    run.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the RNGs and the data order (default 0)")
    run.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 with loss scaling on CUDA")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    freeze = parser.add_argument_group("sequential freezing")
    freeze.add_argument("--freeze", choices=("none", *SCHEDULES), default="rotate",
                        help="rotate: one factor of each decomposed layer trains per phase, in turn (default); "
                             "freeze_one: all but one train, the frozen one rotates; static: only the SVD second "
                             "factor and the Tucker-2 core ever train; none: everything trains")
    freeze.add_argument("--every-epochs", type=_positive_int, default=1, help="epochs per phase (default 1)")
    freeze.add_argument("--every-steps", type=_positive_int, help="optimizer steps per phase (overrides --every-epochs)")
    freeze.add_argument("--freeze-undecomposed", action="store_true",
                        help="keep every layer that was not decomposed frozen (default: they train)")

    distill = parser.add_argument_group("knowledge distillation")
    distill.add_argument("--distill", action="store_true",
                         help="distil from the model before decomposition (KL on softened logits + task loss)")
    distill.add_argument("--alpha", type=float, default=DEFAULTS.alpha,
                         help="weight of the distillation loss; the task loss gets 1 - alpha (default 0.5)")
    distill.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                         help="softmax temperature of the distillation loss (default 4)")

    state = parser.add_argument_group("checkpoints and output")
    state.add_argument("--checkpoint-dir", help="write checkpoint.pt here at the end of every epoch")
    state.add_argument("--checkpoint-every-steps", type=_positive_int, help="also checkpoint every N optimizer steps")
    state.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/checkpoint.pt")
    state.add_argument("--max-steps", type=_positive_int, help="stop after N optimizer steps in all, checkpointing there")
    state.add_argument("--output", "-o", help=f"save the fine-tuned model here (lrd.save) with {HISTORY_NAME}")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.source and args.ratio:
        raise ValueError("give --from DIR or --ratio, not both")
    if ":" in args.model and args.input_shape is None:
        args.input_shape = (1, 28, 28)
    model, _ = load_model(args)
    teacher = copy.deepcopy(model).eval() if args.distill else None
    if args.source:
        lrd.load(args.source, model)
    elif args.ratio:
        lrd.decompose(model, ratio=args.ratio, min_rank=args.min_rank)
    train, test = _datasets(args)
    created = init_distributed()
    try:
        history = finetune(
            model, train, test, teacher=teacher, progress=not args.no_progress,
            epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
            weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
            schedule=None if args.freeze == "none" else args.freeze, every_epochs=args.every_epochs,
            every_steps=args.every_steps, freeze_undecomposed=args.freeze_undecomposed,
            batch_size=args.train_batch_size, alpha=args.alpha, temperature=args.temperature, amp=args.amp,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every_steps=args.checkpoint_every_steps,
            resume=args.resume, max_steps=args.max_steps, seed=args.seed,
        )
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            print(history)
        if args.output:
            lrd.save(model, args.output)
            if rank0:
                (Path(args.output) / HISTORY_NAME).write_text(json.dumps(history.to_dict(), indent=2) + "\n")
                print(f"saved to {args.output}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _datasets(args: argparse.Namespace) -> tuple[TensorDataset, TensorDataset]:
    train = data.load(args.dataset, "train", limit=args.train_limit)
    test = data.load(args.dataset, "test", limit=args.test_limit)
    if args.no_standardize:
        return train, test
    images = train.tensors[0]
    mean, std = float(images.mean()), float(images.std())
    return tuple(TensorDataset(data.normalize(d.tensors[0], mean, std), d.tensors[1]) for d in (train, test))
