"""`lrdaccel export`: write a model for deployment, checked against PyTorch.

The model is a zoo name or `package.module:factory` (with --weights), as it is or rebuilt from a
directory written by `lrdaccel compress` (--from), or a classifier saved by `lrdaccel finetune
--task ... -o DIR` (--from DIR with the --model it was made from: its head is rebuilt too). With
--fuse each BatchNorm that directly follows a conv is folded into it first (exactly; the report
lists what stayed unfused and why). The file
is run in ONNX Runtime on the example input (--batch-size, --input-shape) and, with a dynamic
batch, on one more batch size; the largest difference from PyTorch is printed, and a difference
above --tolerance is an error (no file written). Batch size and a transformer's sequence length
stay free (--no-dynamic-batch, --no-dynamic-sequence fix them). With --quantize int8 the file is
ONNX Runtime's int8 quantization (dynamic for MatMul/Gemm; static for convs with --calibration N),
checked against the float model with the int8 tolerance. Needs `pip install lrdaccel[onnx]`.
"""

from __future__ import annotations

import argparse

from lrdaccel import data
from lrdaccel.cli._common import add_model_args, check_outputs, load_model, positive_int, require_data
from lrdaccel.cli.compress import TEXT, calibration_batches, text_batches
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.deploy import EXPORT_FORMATS, ExportConfig, export_onnx
from lrdaccel.deploy.onnx_quantize import QUANTIZE_CHOICES
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
    add_config_args(parser, ExportConfig, ("fuse", "dynamic_batch", "dynamic_sequence", "quantize", "tolerance"),
                    choices={"quantize": QUANTIZE_CHOICES})
    parser.add_argument("--calibration", type=positive_int, metavar="N",
                        help="with --quantize int8: N calibration batches (of --batch-size samples) for static "
                             "int8 convs (without them convs stay float)")
    parser.add_argument("--calibration-data", default="fashion-mnist", choices=(*data.NAMES, TEXT),
                        help="where --calibration batches come from, as for `lrdaccel compress` "
                             "(default fashion-mnist)")
    parser.add_argument("--output", "-o", required=True, help="the file to write, e.g. model.onnx (missing folders "
                                                              "are created)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_outputs(files={"--output": args.output})
    config = ExportConfig(**given(args, ExportConfig))
    if args.calibration is not None and not config.quantize:
        raise ValueError("--calibration is for --quantize int8 (static int8 convs)")
    if args.calibration is not None and args.calibration_data == TEXT and args.model != "minilm":
        raise ValueError("--calibration-data text is tokenized for --model minilm")
    onnxruntime()  # before any work: say how to install it where it is missing
    if args.calibration is not None:
        require_data("--calibration-data", args.calibration_data)
    model, example = load_model(args, check_input=not args.source)
    if args.source:
        model = load_saved(args.source, model, example)
    calibration = None
    if args.calibration is not None:
        calibration = (text_batches(args.calibration, args.batch_size) if args.calibration_data == TEXT
                       else calibration_batches(args.calibration_data, args.calibration, args.batch_size))
    report = export_onnx(model.eval(), example, args.output, calibration=calibration, config=config)
    print(report)
    return 0
