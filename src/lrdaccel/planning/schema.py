"""The plan file's JSON schema: every field's check, and what a newer version's extra fields get
(a warning to upgrade). Kinds are looked up in an allow-list; nothing is imported or parsed from
text. Derived counts (parameters, MACs) are not read: `LayerPlan` recomputes them."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

from lrdaccel._files import check_header
from lrdaccel.planning.dataflow import ACTIVATIONS

PLAN_FORMAT = "lrdaccel.plan"
PLAN_VERSION = 1
KINDS = ("svd", "tucker2", "tucker2_branched", "merged", "narrow", "keep")
LAYER_KINDS = ("svd", "tucker2")  # the decomposition a layer's type gets; what rank optimization searches
PAIR_KINDS = ("tucker2", "tucker2_branched", "merged")  # ranks (rank_in, rank_out)


def check_plan_fields(data: Any, source: str) -> None:
    """The header and top-level fields of a plan's dict.

    Raises:
        ValueError: naming `source` and the field that is wrong.
    """
    check_header(data, PLAN_FORMAT, PLAN_VERSION, source, "plan")
    _check_fields(data, _PLAN_SCHEMA, source, _TOP_LEVEL_OPTIONAL)


def row_fields(raw: Any, where: str) -> tuple[str, dict]:
    """(where, the LayerPlan fields) of one checked row of a plan's dict; `where` gains the row's name.

    Raises:
        ValueError: naming `where`, the row and the field that is wrong.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str):
        where += f" ({raw['name']!r})"
    _check_fields(raw, _ROW_SCHEMA, where, _ROW_OPTIONAL)
    _check_rank_field(raw, "rank", where, raw["kind"])
    _check_rank_field(raw, "ratio_rank", where, None)
    values = {k: v for k, v in raw.items() if k in _ROW_SCHEMA}
    if values.get("merge") is not None:
        _check_fields(values["merge"], _MERGE_SCHEMA, f"{where}: field 'merge'", _MERGE_OPTIONAL)
        values["merge"] = {k: v for k, v in values["merge"].items() if k in _MERGE_SCHEMA}
    if values.get("narrow") is not None:
        _check_fields(values["narrow"], _NARROW_SCHEMA, f"{where}: field 'narrow'", _NARROW_OPTIONAL)
        values["narrow"] = {k: v for k, v in values["narrow"].items() if k in _NARROW_SCHEMA}
    return where, values


# field -> (check, what it must be)
def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_shape(value: Any) -> bool:
    return (isinstance(value, Mapping) and set(value) == {"out", "in", "kernel"} and _is_int(value["out"], 0)
            and _is_int(value["in"], 0) and isinstance(value["kernel"], (list, tuple))
            and all(_is_int(k, 1) for k in value["kernel"]))


_PLAN_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: isinstance(v, str), "a string"),
    "version": (lambda v: _is_int(v, 1), "an int >= 1"),
    "lrdaccel_version": (lambda v: isinstance(v, str), "a string"),
    "ratio": (lambda v: v is None or (_is_number(v) and v > 1), "null or a number > 1"),
    "beta": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "meta": (lambda v: isinstance(v, Mapping), "an object"),
    "layers": (lambda v: isinstance(v, list), "a list of layer objects"),
}
_TOP_LEVEL_OPTIONAL = {"lrdaccel_version", "ratio", "beta", "meta"}
_ROW_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "kind": (lambda v: v in KINDS, f"one of {list(KINDS)}"),
    "rank": (lambda v: True, ""),  # checked against the kind by _check_rank_field
    "reason": (lambda v: isinstance(v, str), "a string"),
    "layer_type": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "shape": (_is_shape, 'an object {"out": int, "in": int, "kernel": [ints]}'),
    "stride": (lambda v: _is_stride(v), "a list of two ints >= 1"),
    "ratio_rank": (lambda v: True, ""),
    "time_original_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "time_ratio_rank_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "time_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "supported": (lambda v: isinstance(v, bool), "true or false"),
    "branches": (lambda v: _is_int(v, 1), "an int >= 1"),
    "merge": (lambda v: v is None or isinstance(v, Mapping), "null or an object naming the merged neighbours"),
    "merge_skipped": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "narrow": (lambda v: v is None or isinstance(v, Mapping), "null or an object naming the consumer"),
}
_ROW_OPTIONAL = {"stride", "ratio_rank", "time_original_ms", "time_ratio_rank_ms", "time_ms", "supported",
                 "branches", "merge", "merge_skipped", "narrow"}


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_stride(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(x, 1) for x in value)


_MERGE_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "first": (_is_name, "a non-empty string"),
    "bn1": (_is_name, "a non-empty string"),
    "bn2": (_is_name, "a non-empty string"),
    "last": (_is_name, "a non-empty string"),
    "first_shape": (_is_shape, 'an object {"out": int, "in": int, "kernel": [ints]}'),
    "last_shape": (_is_shape, 'an object {"out": int, "in": int, "kernel": [ints]}'),
    "act1": (lambda v: v is None or v in ACTIVATIONS, f"null or one of {sorted(ACTIVATIONS)}"),
    "act2": (lambda v: v is None or v in ACTIVATIONS, f"null or one of {sorted(ACTIVATIONS)}"),
    "bn3": (lambda v: v is None or _is_name(v), "null or a non-empty string"),
    "first_stride": (_is_stride, "a list of two ints >= 1"),
}
_MERGE_OPTIONAL = {"act1", "act2", "bn3", "first_stride"}
_NARROW_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "consumer": (_is_name, "a non-empty string"),
    "consumer_type": (_is_name, "a non-empty string"),
    "consumer_shape": (_is_shape, 'an object {"out": int, "in": int, "kernel": [ints]}'),
    "resized": (lambda v: isinstance(v, (list, tuple)) and all(_is_name(x) for x in v), "a list of names"),
    "depthwise_area": (lambda v: _is_int(v, 0), "an int >= 0"),
    "co_producers": (lambda v: isinstance(v, (list, tuple)) and all(_is_name(x) for x in v), "a list of names"),
    "co_producer_inputs": (lambda v: _is_int(v, 0), "an int >= 0"),
    "heads": (lambda v: _is_int(v, 0), "an int >= 0"),
    "attention": (lambda v: isinstance(v, str), "a string"),
}
_NARROW_OPTIONAL = {"resized", "depthwise_area", "co_producers", "co_producer_inputs", "heads", "attention"}
_DERIVED = {"params_before", "params_after", "macs_before", "macs_after"}


def _check_fields(data: Mapping, schema: dict, where: str, optional: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    missing = sorted(set(schema) - optional - set(data))
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    for key, value in data.items():
        if key in schema:
            check, expected = schema[key]
            if not check(value):
                raise ValueError(f"{where}: field {key!r} must be {expected}, got {value!r}")
    extra = set(data) - set(schema) - (_DERIVED if schema is _ROW_SCHEMA else set())
    if extra:
        warnings.warn(f"{where}: ignoring unknown plan fields {sorted(extra)}; upgrade lrdaccel", stacklevel=3)


def _check_rank_field(raw: Mapping, field: str, where: str, kind: str | None) -> None:
    """rank: None for keep, an int >= 1 for svd and narrow (the kept width), two ints >= 1 for the
    pair kinds; ratio_rank: any of those."""
    value = raw.get(field)
    is_int = _is_int(value, 1)
    is_pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(r, 1) for r in value)
    pair = (is_pair, "a list of two ints >= 1 [rank_in, rank_out]")
    expected = {"keep": (value is None, "null"), "svd": (is_int, "an int >= 1"), "narrow": (is_int, "an int >= 1"),
                **{k: pair for k in PAIR_KINDS},
                None: (value is None or is_int or is_pair, "null, an int >= 1 or two ints >= 1")}[kind]
    if not expected[0]:
        what = f"for kind {kind!r} " if kind else ""
        raise ValueError(f"{where}: field {field!r} {what}must be {expected[1]}, got {value!r}")
