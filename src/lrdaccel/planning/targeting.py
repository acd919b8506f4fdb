"""Selecting modules by name the way PEFT users expect.

A string is a full regex on the qualified module name; a list matches exact names or dotted
suffixes ("attention.query" matches "encoder.layer.0.attention.query"); a callable is
`filter_fn(module, name) -> bool`. A pattern that matches no candidate layer is an error.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Union

from torch import nn

Selector = Union[str, Iterable[str], Callable[[nn.Module, str], bool], None]


def matches_name(name: str, entry: str) -> bool:
    """An exact qualified name, or a dotted suffix of it ("query" matches "layer.0.query")."""
    return name == entry or name.endswith("." + entry)


def compile_selector(selector: Selector, what: str, names: list[str]) -> Callable[[nn.Module, str], bool] | None:
    """Turn include/exclude into a predicate, checking every pattern matches some candidate."""
    if selector is None:
        return None
    if callable(selector):
        return selector
    if not isinstance(selector, (str, list, tuple, set, frozenset)) or (
            not isinstance(selector, str) and not all(isinstance(e, str) for e in selector)):
        raise ValueError(f"{what} must be a regex string, a list of layer names or dotted suffixes, or a callable "
                         f"(module, name) -> bool; got {selector!r}")
    if isinstance(selector, str):
        try:
            pattern = re.compile(selector)
        except re.error as error:
            raise ValueError(f"{what}: {selector!r} is not a valid regex ({error})") from None
        if not any(pattern.fullmatch(n) for n in names):
            raise ValueError(f"{what}: regex {selector!r} matches none of the {len(names)} candidate layers")
        return lambda module, name: pattern.fullmatch(name) is not None
    entries = list(selector)
    unknown = [e for e in entries if not any(matches_name(n, e) for n in names)]
    if unknown:
        raise ValueError(f"{what}: no candidate layer named {unknown} (candidates: {_preview(names)})")
    return lambda module, name: any(matches_name(name, e) for e in entries)


def resolve_per_layer(what: str, mapping: Mapping | None, names: list[str]) -> dict:
    """Map each candidate name to its value; keys may be exact names or dotted suffixes.

    Raises:
        ValueError: not a mapping, or a key that names no candidate.
    """
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must be a mapping of layer name -> value, got {type(mapping).__name__}")
    resolved = {}
    for key, value in mapping.items():
        hits = [n for n in names if matches_name(n, key)]
        if not hits:
            raise ValueError(f"{what}: no candidate layer named {key!r}")
        for hit in hits:
            resolved[hit] = value
    return resolved


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
