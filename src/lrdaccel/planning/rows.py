"""A plan's rows: `LayerPlan` (one candidate layer: what happens to it and why) and `Plan`
(the rows in model order), their JSON form and their printed table.

A plan is data: `lrdaccel.planning.planner.plan` makes one, `optimize_ranks` rewrites one,
`decompose` applies one, `save` stores one beside the weights.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping

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
        layer_type: class name of the dense layer (Linear, Conv1D, Conv2d).
        shape: {"out", "in", "kernel"} of the dense weight; checked when the plan is applied.
        stride: conv stride (the Tucker-2 input 1x1 runs at input resolution).
        params_before / params_after: weight parameters (biases excluded; they are unchanged).
        macs_before / macs_after: multiply-accumulates per output position (token or pixel).
        ratio_rank: the rank the compression ratio gave, before any rank optimization.
        time_original_ms / time_ratio_rank_ms / time_ms: measured by `optimize_ranks`.
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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        self.stride = tuple(self.stride)
        self.rank = _as_rank(self.rank)
        self.ratio_rank = _as_rank(self.ratio_rank)
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


def _as_rank(rank: Any) -> Rank:
    if rank is None or isinstance(rank, int):
        return rank
    return tuple(int(r) for r in rank)


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
        """Weight parameters and per-position MACs summed over all candidate layers."""
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(row, k) for row in self.layers) for k in keys}

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
        """Validate and rebuild; kinds are looked up in an allow-list, nothing is imported."""
        check_header(data, PLAN_FORMAT, PLAN_VERSION, source, "plan")
        known = {f.name for f in fields(LayerPlan)}
        derived = {"params_before", "params_after", "macs_before", "macs_after"}
        rows = []
        for i, raw in enumerate(data.get("layers", [])):
            if not isinstance(raw, Mapping):
                raise ValueError(f"{source}: layer entry {i} is not an object")
            extra = set(raw) - known
            if extra:
                warnings.warn(f"{source}: ignoring unknown plan keys {sorted(extra)}; upgrade lrdaccel", stacklevel=2)
            try:
                rows.append(LayerPlan(**{k: v for k, v in raw.items() if k in known - derived}))
            except (TypeError, KeyError) as error:
                raise ValueError(f"{source}: layer entry {i} ({raw.get('name')!r}) is malformed: {error}") from None
        return cls(rows, ratio=data.get("ratio"), beta=data.get("beta", 1.0), meta=dict(data.get("meta") or {}))

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
            shape = f"{s['out']}x{s['in']}" + ("" if s["kernel"] == [1, 1] else "x{}x{}".format(*s["kernel"]))
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
