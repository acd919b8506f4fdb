"""Options shared by subcommands: which model, which weights, which input; argparse types."""

from __future__ import annotations

import argparse
import importlib

import torch
from torch import nn

from lrdaccel import zoo
from lrdaccel.measure.machine import parse_threads


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1, "a positive int")


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0, "an int >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def threads_type(text: str):
    """argparse type for --threads: an int >= 1 or 'auto', with lrdaccel.measure.machine's message."""
    try:
        return parse_threads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="resnet50",
        help=f"a zoo name ({', '.join(zoo.names())}) or 'package.module:factory' returning an nn.Module",
    )
    parser.add_argument("--weights", help="a .safetensors state dict to load into the model before anything else")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batch of the example input (default 8)")
    parser.add_argument(
        "--input-shape", type=_shape, default=None,
        help="example input shape without the batch, e.g. 3,224,224 (default: the zoo model's own)",
    )


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
