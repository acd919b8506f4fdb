"""`lrdaccel export`: write a model for deployment, checked against PyTorch.

The model is a zoo name or `package.module:factory` (with --weights), as it is or rebuilt from a
directory written by `lrdaccel compress` (--from), or a classifier saved by `lrdaccel finetune
--task ... -o DIR` (--from DIR with the --model it was made from: its head is rebuilt too). With
--fuse each BatchNorm that directly follows a conv is folded into it first (exactly; the report lists what stayed unfused and why). The file
is run in ONNX Runtime on the example input (--batch-size, --input-shape) and, with a dynamic
batch, on one more batch size; the largest difference from PyTorch is printed, and a difference
above --tolerance is an error (no file written). Needs `pip install lrdaccel[onnx]`.
"""

from __future__ import annotations

import argparse

from lrdaccel.cli._common import add_model_args, check_outputs, load_model
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.deploy import EXPORT_FORMATS, ExportConfig, export_onnx
from lrdaccel.deploy.onnx_session import onnxruntime
from lrdaccel.tasks.saved import load_saved

ORDER = 70  # place in `lrdaccel --help`: the pipeline's order


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="write a (decomposed, BatchNorm-folded) model to ONNX, checked with ONNX Runtime",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="a decomposed model saved by `lrdaccel compress -o DIR`, rebuilt on --model")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                        help=f"file format (default {EXPORT_FORMATS[0]})")
    add_config_args(parser, ExportConfig, ("fuse", "dynamic_batch", "tolerance"))
    parser.add_argument("--output", "-o", required=True, help="the file to write, e.g. model.onnx (missing folders "
                                                              "are created)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_outputs(files={"--output": args.output})
    config = ExportConfig(**given(args, ExportConfig))
    onnxruntime()  # before any work: say how to install it where it is missing
    model, example = load_model(args, check_input=not args.source)
    if args.source:
        model = load_saved(args.source, model, example)
    report = export_onnx(model.eval(), example, args.output, config=config)
    print(report)
    return 0
