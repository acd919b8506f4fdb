"""Options shared by subcommands: which model, which weights, which input."""

from __future__ import annotations

import argparse
import importlib

import torch
from torch import nn

from lrdaccel import zoo
from lrdaccel.bench.cpu import parse_threads


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="resnet50",
        help=f"a zoo name ({', '.join(zoo.names())}) or 'package.module:factory' returning an nn.Module",
    )
    parser.add_argument("--weights", help="a .safetensors state dict to load into the model before anything else")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the example input (default 8)")
    parser.add_argument(
        "--input-shape", type=_shape, default=None,
        help="example input shape without the batch, e.g. 3,224,224 (default: the zoo model's own)",
    )


def threads_type(text: str):
    """argparse type for --threads: an int >= 1 or 'auto', with lrdaccel.bench.cpu's message."""
    try:
        return parse_threads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    """(model, example_inputs) from --model / --weights / --batch-size / --input-shape."""
    if ":" in args.model:
        module_name, _, attr = args.model.partition(":")
        model = getattr(importlib.import_module(module_name), attr)()
        if args.input_shape is None:
            raise ValueError(f"--model {args.model}: give --input-shape for a model outside the zoo")
        example = torch.randn(args.batch_size, *args.input_shape)
    else:
        spec = zoo.get(args.model)
        model = spec.build()
        example = spec.example_inputs(args.batch_size, args.input_shape)
    if args.weights:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
        if missing or unexpected:
            raise ValueError(f"--weights {args.weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, example
