"""What the training subcommands (finetune, distill) share: the decomposed model they start from,
and how a run is saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.io import CONFIG_NAME, load, read_config, save
from lrdaccel.planning import Plan, PlanConfig
from lrdaccel.decomposition import decompose
from lrdaccel.training.distributed import is_main_process
from lrdaccel.training.history import History

HISTORY_NAME = "history.json"


def add_source_args(parser: argparse.ArgumentParser, plan: bool = False) -> None:
    """--from DIR / --ratio R / --min-rank (and --plan FILE where `plan`): where the decomposed
    model comes from."""
    source = parser.add_argument_group("decomposition")
    source.add_argument("--from", dest="source", metavar="DIR",
                        help="a decomposed model saved by `lrdaccel compress -o DIR` (or, with --task, a classifier "
                             "saved by `lrdaccel finetune --task ... -o DIR`), rebuilt on --model")
    source.add_argument("--ratio", type=float,
                        help="decompose --model here at this per-layer compression ratio (instead of --from)")
    if plan:
        source.add_argument("--plan", metavar="FILE",
                            help="decompose --model here by this plan JSON (from `lrdaccel plan -o` or `lrdaccel "
                                 "optimize -o`) instead of --ratio")
    add_config_args(source, PlanConfig, ("min_rank",))


def decompose_from_args(model: nn.Module, args: argparse.Namespace) -> None:
    """Rebuild --from DIR on `model`, or decompose it by --plan, or at --ratio (and --min-rank);
    with none, leave it as it is."""
    if args.source:
        load(args.source, model)
    elif getattr(args, "plan", None):
        decompose(model, Plan.load(args.plan))
    elif args.ratio is not None:
        decompose(model, **given(args, PlanConfig))


def saved_layers(directory: str) -> int:
    """How many layers the model `lrd.save` wrote to `directory` has decomposed (or merged): a
    classifier fine-tuned whole has none, and nothing to freeze in turn.

    Raises:
        FileNotFoundError / ValueError: no lrdaccel config there, or not one of ours (naming it).
    """
    config = read_config(directory)
    return len(Plan.from_dict(config.get("plan"), source=str(Path(directory) / CONFIG_NAME)).changed)


def check_amp(options: dict) -> None:
    """--amp-dtype without --amp would be silently ignored (nothing is autocast): refuse it.

    Raises:
        ValueError: naming both options.
    """
    if "amp_dtype" in options and not options.get("amp"):
        raise ValueError(f"--amp-dtype {options['amp_dtype']} has no effect without --amp: add --amp to autocast in "
                         f"{options['amp_dtype']}, or leave --amp-dtype out")


def save_run(model: nn.Module, history: History, directory: str) -> None:
    """`lrd.save` the model with the run's history beside it (only rank 0 writes)."""
    save(model, directory)
    save_history(history, directory)


def save_history(history: History, directory: str) -> None:
    """The run's history beside the model saved in `directory` (only rank 0 writes)."""
    if is_main_process():
        (Path(directory) / HISTORY_NAME).write_text(json.dumps(history.to_dict(), indent=2) + "\n")
        print(f"saved to {directory}")
