"""The one way every public verb takes its settings, and the checks their fields share.

Each verb has a small dataclass config (`PlanConfig`, `SearchSettings`, `FinetuneConfig`, ...)
that validates itself in `__post_init__`; the verb also accepts the same fields as keyword
arguments, which override the config's (`resolve`). The CLI builds the same objects, so a value
is checked in one place whichever way it arrives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import torch

Config = TypeVar("Config")


def resolve(cls: type[Config], config: Config | None, overrides: dict[str, Any], verb: str) -> Config:
    """`config` (default: `cls()`) with the keyword `overrides` applied, validated again.

    Raises:
        ValueError: a keyword that is not a field of `cls`, naming the known ones, or a bad value.
    """
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown {verb} settings {unknown}; known: {known}")
    if config is None:
        return cls(**overrides)
    if not isinstance(config, cls):
        raise ValueError(f"{verb}: config must be a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


def check_int(what: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """An int (not a bool) >= minimum; None too where optional."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        prefix = "None or " if optional else ""
        raise ValueError(f"{what} must be {prefix}an int >= {minimum}, got {value!r}")


def check_number(what: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, optional: bool = False) -> None:
    """A finite int or float (not a bool) within the given bounds; None too where optional."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
                  f"<= {at_most:g}" if at_most is not None else ""]
        bound = " and ".join(b for b in bounds if b)
        prefix = "None or " if optional else ""
        raise ValueError(f"{what} must be {prefix}a finite number{' ' + bound if bound else ''}, got {value!r}")


def check_choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from itself or its name ("float32", "bfloat16", "torch.float16")."""
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (float32, float16, bfloat16), "
                         f"got {dtype!r}")
    return value


def parse_device(device: torch.device | str) -> torch.device:
    """A torch device from itself or its name, that this machine has.

    Raises:
        ValueError: not a device name, or CUDA asked for where there is none.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    return parsed
