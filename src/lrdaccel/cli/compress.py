"""`lrdaccel compress`: decompose a model by a plan (or a ratio) and save it.

The saved directory (`lrd.save`: the plan and the weights) reloads with `lrd.load` and fine-tunes.
With --fuse the deployable form is written beside it: every BatchNorm that directly follows a
conv folded into it, exported to `model.onnx` and checked with ONNX Runtime. A folded model has
no BatchNorm to fine-tune and another structure than its plan describes, so it is kept only as
that export; in Python, `lrd.fuse_batchnorm(lrd.load(dir, base).eval())` gives it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lrdaccel import data
from lrdaccel.cli._common import add_model_args, check_outputs, load_model, positive_int
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.cli.plan import add_plan_args, plan_from_args
from lrdaccel.deploy import export_onnx
from lrdaccel.deploy.onnx_session import onnxruntime
from lrdaccel.io import save
from lrdaccel.planning import Plan
from lrdaccel.surgery import METHODS, DecomposeConfig, decompose


ORDER = 30  # place in `lrdaccel --help`: the pipeline's order
ONNX_NAME = "model.onnx"

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compress", help="decompose a model and save it (weights + plan)",
                                   description=__doc__)
    add_model_args(parser)
    add_plan_args(parser)
    parser.add_argument("--plan", help="a plan JSON from `lrdaccel plan -o` or `lrdaccel optimize -o` "
                                       "(overrides --ratio and the other plan options)")
    parser.add_argument("--output", "-o", required=True, help="directory to save the decomposed model to")
    add_config_args(parser, DecomposeConfig, ("method", "n_iter", "damping"), choices={"method": METHODS},
                    notes={"method": "whiten needs --calibration"})
    parser.add_argument("--calibration", type=positive_int, metavar="N",
                        help="number of calibration batches (of --batch-size images) for --method whiten")
    parser.add_argument("--calibration-data", default="fashion-mnist", choices=data.NAMES,
                        help="training split the calibration images come from, normalised with "
                             "lrdaccel.data.normalize (default fashion-mnist)")
    parser.add_argument("--fuse", action="store_true",
                        help=f"also fold BatchNorm into the convs before them and write the result to "
                             f"{ONNX_NAME} in --output, checked with ONNX Runtime (needs lrdaccel[onnx])")
    return parser


def calibration_batches(name: str, n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """`n_batches` normalised image batches drawn (fixed seed) from the training split of `name`."""
    images = data.load(name, "train").tensors[0]
    if n_batches * batch_size > len(images):
        raise ValueError(f"--calibration {n_batches} x --batch-size {batch_size} asks for more images "
                         f"than {name!r} has ({len(images)})")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    chosen = data.normalize(images[order[:n_batches * batch_size]])
    return list(chosen.split(batch_size))


def run(args: argparse.Namespace) -> int:
    check_outputs(dirs={"--output": args.output})
    config = DecomposeConfig(**given(args, DecomposeConfig))
    if args.calibration is not None and config.method != "whiten":
        raise ValueError("--calibration is only used by --method whiten")
    if config.method == "whiten" and args.calibration is None:
        raise ValueError("--method whiten needs --calibration N (batches of calibration images)")
    if args.fuse:
        onnxruntime()  # before any work: say how to install it where it is missing
    model, example = load_model(args, check_input=True)
    plan = Plan.load(args.plan) if args.plan else plan_from_args(model, args)
    calibration = None
    if config.method == "whiten":
        calibration = calibration_batches(args.calibration_data, args.calibration, args.batch_size)
    report = decompose(model, plan, example_inputs=example, calibration=calibration, config=config, progress=True)
    print(report)
    save(model, args.output)
    print(f"saved to {args.output}")
    if args.fuse:
        print(export_onnx(model.eval(), example, Path(args.output) / ONNX_NAME, fuse=True))
    return 0
