"""A plan's rows: `LayerPlan` (one candidate layer: what happens to it and why) and `Plan`
(the rows in model order), their JSON form and their printed table.

A plan is data: `lrdaccel.planning.planner.plan` makes one, `optimize_ranks` rewrites one,
`decompose` applies one, `save` stores one beside the weights.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping

from lrdaccel._files import check_header
from lrdaccel._version import __version__
from lrdaccel.factorize.ranks import Rank, layer_cost, weight_params

PLAN_FORMAT = "lrdaccel.plan"
PLAN_VERSION = 1
KINDS = ("svd", "tucker2", "keep")


@dataclass
class LayerPlan:
    """One candidate layer: what happens to it and why.

    Attributes:
        name: qualified module name in the model.
        kind: "svd", "tucker2" or "keep".
        rank: int for SVD, (rank_in, rank_out) for Tucker-2, None for keep.
        reason: why kept, or how the rank was chosen.
        layer_type: class name of the dense layer (Linear, Conv1D, Conv2d, or what the row keeps).
        shape: {"out", "in", "kernel"} of the dense weight; checked when the plan is applied.
        stride: conv stride (the Tucker-2 input 1x1 runs at input resolution).
        params_before / params_after: weight parameters (biases excluded; they are unchanged).
        macs_before / macs_after: multiply-accumulates per output position (token or pixel).
        ratio_rank: the rank the compression ratio gave, before any rank optimization.
        time_original_ms / time_ratio_rank_ms / time_ms: measured by `optimize_ranks`.
        supported: False for a weight layer no decomposition applies to (its type, an overridden
            forward, a parametrized weight); such rows are listed with their reason but left out
            of the totals.
    """

    name: str
    kind: str
    rank: Rank
    reason: str
    layer_type: str
    shape: dict
    stride: tuple[int, int] = (1, 1)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    ratio_rank: Rank = None
    time_original_ms: float | None = None
    time_ratio_rank_ms: float | None = None
    time_ms: float | None = None
    supported: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        self.stride = tuple(self.stride)
        self.rank = _as_rank(self.rank, self.name)
        self.ratio_rank = _as_rank(self.ratio_rank, self.name)
        self.params_before = weight_params(self.shape)
        self.macs_before = self.params_before
        self.params_after, self.macs_after = layer_cost(self.kind, self.rank, self.shape, self.stride)

    @property
    def decomposed(self) -> bool:
        return self.kind != "keep"

    def with_rank(self, rank: Rank, reason: str, kind: str | None = None) -> "LayerPlan":
        """A copy at another rank (or kept), with counts recomputed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(rank=rank, reason=reason, kind=kind or self.kind)
        if values["kind"] == "keep":
            values["rank"] = None
        return LayerPlan(**values)


def _as_rank(rank: Any, name: str) -> Rank:
    """None, an int, or a pair of ints (a JSON list becomes a tuple); nothing is parsed from text."""
    if rank is None or (isinstance(rank, int) and not isinstance(rank, bool)):
        return rank
    if isinstance(rank, (tuple, list)) and len(rank) == 2 and all(
            isinstance(r, int) and not isinstance(r, bool) for r in rank):
        return tuple(rank)
    raise ValueError(f"layer {name!r}: a rank is an int (SVD) or a pair of ints (Tucker-2), got {rank!r}")


@dataclass
class Plan:
    """The rows of a decomposition plan, in model order. Iterable, indexable by layer name."""

    layers: list[LayerPlan]
    ratio: float | None = None
    beta: float = 1.0
    meta: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the plan")

    def replace(self, row: LayerPlan) -> "Plan":
        """A new plan with `row` in place of the row of the same name."""
        layers = [row if r.name == row.name else r for r in self.layers]
        return Plan(layers, ratio=self.ratio, beta=self.beta, meta=dict(self.meta))

    @property
    def decomposed(self) -> list[LayerPlan]:
        return [row for row in self.layers if row.decomposed]

    def totals(self) -> dict[str, int]:
        """Weight parameters and per-position MACs summed over the supported candidate layers."""
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(row, k) for row in self.layers if row.supported) for k in keys}

    # JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "lrdaccel_version": __version__,
            "ratio": self.ratio,
            "beta": self.beta,
            "meta": self.meta,
            "layers": [asdict(row) for row in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "plan") -> "Plan":
        """Validate against the plan schema and rebuild; kinds are looked up in an allow-list,
        nothing is imported or parsed from text.

        Raises:
            ValueError: naming `source`, the row and the field that is wrong.
        """
        check_header(data, PLAN_FORMAT, PLAN_VERSION, source, "plan")
        _check_fields(data, _PLAN_SCHEMA, source, _TOP_LEVEL_OPTIONAL)
        layers = data.get("layers")
        rows = []
        for i, raw in enumerate(layers):
            where = f"{source}: layer {i}"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
            if isinstance(raw.get("name"), str):
                where += f" ({raw['name']!r})"
            _check_fields(raw, _ROW_SCHEMA, where, _ROW_OPTIONAL)
            _check_rank_field(raw, "rank", where, raw["kind"])
            _check_rank_field(raw, "ratio_rank", where, None)
            rows.append(LayerPlan(**{k: v for k, v in raw.items() if k in _ROW_SCHEMA}))
        ratio = data.get("ratio")
        return cls(rows, ratio=ratio, beta=data.get("beta", 1.0), meta=dict(data.get("meta") or {}))

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON ({error})") from None
        return cls.from_dict(data, source)

    def save(self, path) -> None:
        with open(path, "w") as handle:
            handle.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as handle:
            return cls.from_json(handle.read(), source=str(path))

    # Printing ------------------------------------------------------------------------------
    def __str__(self) -> str:
        header = ("layer", "type", "shape", "kind", "rank", "params", "reason")
        lines = []
        for row in self.layers:
            s = row.shape
            shape = "x".join(str(d) for d in [s["out"], s["in"], *([] if s["kernel"] == [1, 1] else s["kernel"])])
            rank = "-" if row.rank is None else (str(row.rank) if isinstance(row.rank, int) else "{}x{}".format(*row.rank))
            params = f"{row.params_before:,} -> {row.params_after:,}" if row.decomposed else f"{row.params_before:,}"
            lines.append((row.name, row.layer_type, shape, row.kind, rank, params, row.reason))
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        t = self.totals()
        saved = 1 - t["params_after"] / t["params_before"] if t["params_before"] else 0.0
        footer = (
            f"{len(self.decomposed)}/{len(self.layers)} layers decomposed; candidate-layer weights "
            f"{t['params_before']:,} -> {t['params_after']:,} ({saved:.1%} fewer)"
        )
        return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines] + [footer])


# The plan's JSON schema: field -> (check, what it must be). Derived counts are recomputed on load.
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
    "stride": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x, 1) for x in v),
               "a list of two ints >= 1"),
    "ratio_rank": (lambda v: True, ""),
    "time_original_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "time_ratio_rank_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "time_ms": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
    "supported": (lambda v: isinstance(v, bool), "true or false"),
}
_ROW_OPTIONAL = {"stride", "ratio_rank", "time_original_ms", "time_ratio_rank_ms", "time_ms", "supported"}
_DERIVED = {"params_before", "params_after", "macs_before", "macs_after"}


def _check_fields(data: Mapping, schema: dict, where: str, optional: set[str]) -> None:
    missing = sorted(set(schema) - optional - set(data))
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    for key, value in data.items():
        if key in schema:
            check, expected = schema[key]
            if not check(value):
                raise ValueError(f"{where}: field {key!r} must be {expected}, got {value!r}")
    extra = set(data) - set(schema) - _DERIVED
    if extra:
        warnings.warn(f"{where}: ignoring unknown plan fields {sorted(extra)}; upgrade lrdaccel", stacklevel=3)


def _check_rank_field(raw: Mapping, field: str, where: str, kind: str | None) -> None:
    """rank: None for keep, an int >= 1 for svd, two ints >= 1 for tucker2; ratio_rank: any of those."""
    value = raw.get(field)
    is_int = _is_int(value, 1)
    is_pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(r, 1) for r in value)
    expected = {"keep": (value is None, "null"), "svd": (is_int, "an int >= 1"),
                "tucker2": (is_pair, "a list of two ints >= 1 [rank_in, rank_out]"),
                None: (value is None or is_int or is_pair, "null, an int >= 1 or two ints >= 1")}[kind]
    if not expected[0]:
        what = f"for kind {kind!r} " if kind else ""
        raise ValueError(f"{where}: field {field!r} {what}must be {expected[1]}, got {value!r}")
