"""`lrdaccel compress`: decompose a model by a plan (or a ratio) and save it.

The saved directory (`lrd.save`: the plan and the weights) reloads with `lrd.load` and fine-tunes.
With --fuse the deployable form is written beside it: every BatchNorm that directly follows a
conv folded into it, exported to `model.onnx` and checked with ONNX Runtime. A folded model has
no BatchNorm to fine-tune and another structure than its plan describes, so it is kept only as
that export; in Python, `lrd.fuse_batchnorm(lrd.load(dir, base).eval(), example_inputs)` gives
it back.

Calibration batches (--calibration N) serve --method whiten (with --sequential: layer by layer on
the partly decomposed model), --merge (what to keep, BatchNorm statistics) and --allocate
sensitivity (ranks under the ratio's budget by measured sensitivity): images of a dataset's
training split, or English sentences of lrdaccel.calibration.corpora's calibration split (--calibration-data
text, tokenized for --model minilm).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lrdaccel import data, zoo
from lrdaccel.calibration import corpora
from lrdaccel.cli._common import add_model_args, check_outputs, load_model, positive_int, require_data
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.cli.plan import add_plan_args, plan_from_args
from lrdaccel.deploy import ExportConfig, export_onnx
from lrdaccel.deploy.onnx_export import check_shapes
from lrdaccel.deploy.onnx_session import onnxruntime
from lrdaccel.io import save
from lrdaccel.planning import Plan, PlanConfig
from lrdaccel.planning.allocation import ALLOCATIONS, BUDGETS
from lrdaccel.planning.sensitivity import SENSITIVITIES
from lrdaccel.factorize.whiten import REFITS
from lrdaccel.decomposition import METHODS, DecomposeConfig, decompose


ORDER = 30  # place in `lrdaccel --help`: the pipeline's order
ONNX_NAME = "model.onnx"
DYNAMIC_AXES = ("dynamic_batch", "dynamic_sequence")  # the export's options --fuse takes
TEXT = "text"

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compress", help="decompose a model and save it (weights + plan)",
                                   description=__doc__)
    add_model_args(parser)
    add_plan_args(parser)
    parser.add_argument("--plan", help="a plan JSON from `lrdaccel plan -o` or `lrdaccel optimize -o` "
                                       "(overrides --ratio and the other plan options)")
    parser.add_argument("--output", "-o", required=True, help="directory to save the decomposed model to")
    add_config_args(parser, PlanConfig, ("allocate", "budget", "sensitivity"),
                    choices={"allocate": ALLOCATIONS, "budget": BUDGETS, "sensitivity": SENSITIVITIES},
                    notes={"allocate": "needs --calibration"})
    add_config_args(parser, DecomposeConfig, ("method", "n_iter", "damping", "sequential", "refit", "refit_damping"),
                    choices={"method": METHODS, "refit": REFITS}, notes={"method": "whiten needs --calibration"})
    parser.add_argument("--calibration", type=positive_int, metavar="N",
                        help="number of calibration batches (of --batch-size samples) for --method whiten, "
                             "--merge (about 1000 images) and --allocate")
    parser.add_argument("--calibration-data", default="fashion-mnist", choices=(*data.NAMES, TEXT),
                        help="training split the calibration images come from, normalised with "
                             "lrdaccel.data.normalize, or 'text': sentences of lrdaccel.calibration.corpora's calibration "
                             f"split, for --model minilm (default fashion-mnist). Each needs something installed "
                             f"({data.needs_text()}; text: Debian's wordnet-base and fortunes-min), checked "
                             f"before any work")
    parser.add_argument("--fuse", action="store_true",
                        help=f"also fold BatchNorm into the convs before them and write the result to "
                             f"{ONNX_NAME} in --output, checked with ONNX Runtime (needs lrdaccel[onnx])")
    add_config_args(parser, ExportConfig, DYNAMIC_AXES,
                    notes={"dynamic_batch": "with --fuse", "dynamic_sequence": "with --fuse"})
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


def text_batches(n_batches: int, batch_size: int) -> list[dict]:
    """`n_batches` tokenized batches of calibration sentences (lrdaccel.calibration.corpora) for MiniLM."""
    texts = corpora.sentences("calibration", limit=n_batches * batch_size)
    return corpora.tokenized_batches(zoo.minilm_tokenizer(), texts, batch_size)


def run(args: argparse.Namespace) -> int:
    check_outputs(dirs={"--output": args.output})
    config = DecomposeConfig(**given(args, DecomposeConfig))
    axes = {key: value for key, value in given(args, ExportConfig).items() if key in DYNAMIC_AXES}
    export_config = ExportConfig(fuse=True, **axes)
    if axes and not args.fuse:
        raise ValueError("--dynamic-batch and --dynamic-sequence are for the --fuse export")
    allocating = getattr(args, "allocate", None) is not None
    if args.plan and allocating:
        raise ValueError("--allocate plans the ranks; it does not apply to a --plan file")
    if args.calibration_data == TEXT and args.model != "minilm":
        raise ValueError("--calibration-data text is tokenized for --model minilm")
    # Everything the run will need, before any work: the export's packages, the calibration data.
    if args.fuse:
        onnxruntime()
    if args.calibration is not None:
        require_data("--calibration-data", args.calibration_data)
    model, example = load_model(args, check_input=True)
    if args.fuse:  # a model that fixes its input shape cannot be exported as asked: say so before saving
        check_shapes(model, example, export_config)
    calibration = None
    if args.calibration is not None:
        calibration = (text_batches(args.calibration, args.batch_size) if args.calibration_data == TEXT
                       else calibration_batches(args.calibration_data, args.calibration, args.batch_size))
    elif config.method == "whiten" or allocating:
        raise ValueError("--method whiten and --allocate need --calibration N (batches of calibration samples)")
    plan = Plan.load(args.plan) if args.plan else plan_from_args(model, args, example,
                                                                 calibration if allocating else None)
    if calibration is not None and not (config.method == "whiten" or plan.merged or allocating):
        raise ValueError("--calibration is only used by --method whiten, --merge and --allocate")
    needed = calibration if config.method == "whiten" or plan.merged else None  # allocation has read them
    report = decompose(model, plan, example_inputs=example, calibration=needed, config=config, progress=True)
    print(report)
    save(model, args.output)
    print(f"saved to {args.output}")
    if args.fuse:
        print(export_onnx(model.eval(), example, Path(args.output) / ONNX_NAME, config=export_config))
    return 0
