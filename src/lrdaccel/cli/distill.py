"""`lrdaccel distill`: train a decomposed model to give the original's outputs again, unlabeled.

The teacher is --model (with --weights) as it is; the student is the same model rebuilt from a
directory written by `lrdaccel compress` (--from) or decomposed here (--ratio). The data carry no
labels: images of a dataset's training split (labels dropped), or real English sentences
(--data text: WordNet examples and glosses and fortunes from lrdaccel.calibration.corpora, tokenized by
--model minilm's tokenizer or --tokenizer). Scores after each epoch come from held-out data
(the test split; the corpus's evaluation split, which shares no sentence with the training one).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from lrdaccel import data, zoo
from lrdaccel.calibration import corpora
from lrdaccel.cli._common import add_model_args, check_outputs, load_model, positive_int, require_data
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.cli._training import HISTORY_NAME, add_source_args, check_amp, decompose_from_args, save_run
from lrdaccel.training.config import AMP_DTYPES, DISTILL_LOSSES, LR_SCHEDULES, OPTIMIZERS, DistillConfig
from lrdaccel.training.distill import distill
from lrdaccel.training.distributed import is_main_process, process_group
from lrdaccel.training.freezer import SCHEDULES

TEXT = "text"

ORDER = 60  # place in `lrdaccel --help`: the pipeline's order


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill", help="recover a decomposed model's outputs from the original's, on unlabeled data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(model="fmnist-cnn")
    add_source_args(parser)

    inputs = parser.add_argument_group("unlabeled data")
    inputs.add_argument("--data", default="fashion-mnist", choices=(*data.NAMES, TEXT),
                        help="images of a dataset's training split, or 'text': English sentences from "
                             f"lrdaccel.calibration.corpora (default fashion-mnist). Needs: {data.needs_text()}; "
                             f"text: Debian's wordnet-base and fortunes-min")
    inputs.add_argument("--limit", type=positive_int, help="use only the first N training images or sentences "
                                                            "(default: all images, 8192 sentences)")
    inputs.add_argument("--eval-limit", type=positive_int, default=512,
                        help="held-out images or sentences scored after each epoch (default 512)")
    inputs.add_argument("--train-batch-size", type=positive_int, default=32,
                        help="samples per distillation step (default 32)")
    inputs.add_argument("--tokenizer", help="a local Hugging Face tokenizer directory for --data text "
                                            "(default: --model minilm's own)")
    inputs.add_argument("--max-length", type=positive_int, default=128, help="tokens per sentence at most (default 128)")
    inputs.add_argument("--no-progress", action="store_true", help="no progress bars")

    run_group = parser.add_argument_group("training")
    add_config_args(run_group, DistillConfig, ("epochs", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule",
                                               "warmup_steps", "loss", "temperature", "match_layers", "eval_mode",
                                               "train_embeddings", "seed", "amp", "amp_dtype"),
                    choices={"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "loss": DISTILL_LOSSES,
                             "amp_dtype": AMP_DTYPES})
    freeze = parser.add_argument_group("sequential freezing")
    add_config_args(freeze, DistillConfig, ("schedule", "every_epochs", "every_steps", "freeze_undecomposed"),
                    flags={"schedule": "--freeze"}, choices={"schedule": SCHEDULES})
    state = parser.add_argument_group("checkpoints and output")
    add_config_args(state, DistillConfig, ("checkpoint_dir", "checkpoint_every_steps", "resume", "max_steps"))
    state.add_argument("--output", "-o", help=f"save the distilled model here (lrd.save) with {HISTORY_NAME}")
    return parser


def _text_batches(args: argparse.Namespace, seed: int) -> tuple[list, list]:
    if args.tokenizer:
        from transformers import AutoTokenizer

        if not Path(args.tokenizer).is_dir():
            raise ValueError(f"--tokenizer {args.tokenizer}: not a directory")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = zoo.minilm_tokenizer()
    train = corpora.sentences("calibration", limit=args.limit or 8192, seed=seed)
    held_out = corpora.sentences("evaluation", limit=args.eval_limit)
    return (corpora.tokenized_batches(tokenizer, train, args.train_batch_size, args.max_length),
            corpora.tokenized_batches(tokenizer, held_out, args.train_batch_size, args.max_length))


def _image_batches(args: argparse.Namespace) -> tuple[list, list]:
    train, test = data.standardized_splits(args.data, args.limit, args.eval_limit)
    return list(train.tensors[0].split(args.train_batch_size)), list(test.tensors[0].split(args.train_batch_size))


def run(args: argparse.Namespace) -> int:
    options = given(args, DistillConfig)
    check_amp(options)
    config = DistillConfig(**options)
    check_outputs(dirs={"--output": args.output, "--checkpoint-dir": config.checkpoint_dir})
    if bool(args.source) == (args.ratio is not None):  # --ratio 0 is a ratio to check, not "no ratio"
        raise ValueError("give --from DIR (a model saved by `lrdaccel compress`) or --ratio R (decompose here), "
                         "one of them")
    if args.data == TEXT and not args.tokenizer and args.model != "minilm":
        raise ValueError("--data text needs --tokenizer DIR (or --model minilm, whose tokenizer ships with it)")
    require_data("--data", args.data, args.tokenizer)  # before any work
    if ":" in args.model and args.input_shape is None:
        args.input_shape = (1, 28, 28)  # the example input is not used: the data decide the shapes
    teacher, _ = load_model(args)
    teacher.eval()
    student = copy.deepcopy(teacher)
    decompose_from_args(student, args)
    batches, held_out = _text_batches(args, config.seed) if args.data == TEXT else _image_batches(args)
    # One process group for the run and the save after it, so that only rank 0 writes.
    with process_group():
        history = distill(student, teacher, batches, config, eval_batches=held_out, progress=not args.no_progress)
        if is_main_process():
            print(history)
        if args.output:
            save_run(student, history, args.output)
    return 0

