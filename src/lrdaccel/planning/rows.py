"""A plan's rows: `LayerPlan` (one candidate layer: what happens to it and why) and `Plan`
(the rows in model order), their JSON form and their printed table.

A plan is data: `lrdaccel.planning.planner.plan` makes one, `optimize_ranks` rewrites one,
`decompose` applies one, `save` stores one beside the weights.

Kinds: "svd" and "tucker2" replace one layer by the decomposition its type gets (the rows rank
optimization searches, `Plan.decomposed`); "tucker2_branched" replaces a k x k conv by a Tucker-2
chain whose core is a grouped conv of `branches` branches; "merged" stands for a whole bottleneck
(1x1 conv -> BN -> act -> k x k conv -> BN -> act -> 1x1 conv): the row is named by the k x k conv,
its rank is (r1, r2), and `merge` names the 1x1 convs it absorbed (which get no rows of their own)
and the BatchNorms resized to r1 / r2 channels; its counts cover all three convs. "narrow" keeps
`rank` of a layer's output channels (the width between it and the consumer `narrow` names, which
gets no row of its own); its counts cover both layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping

from lrdaccel._files import atomic_write
from lrdaccel._version import __version__
from lrdaccel.factorize.branched import branched_params
from lrdaccel.factorize.ranks import Rank, layer_cost, weight_params
from lrdaccel.planning.pairs import NarrowPair, narrow_cost
from lrdaccel.planning.schema import (KINDS, LAYER_KINDS, PLAN_FORMAT, PLAN_VERSION, check_plan_fields,
                                      row_fields)



@dataclass(frozen=True)
class MergeBlock:
    """The neighbours a merged row absorbs: `first -> bn1 -> act1 -> (the row's conv) -> bn2 -> act2
    -> last [-> bn3]`, by qualified module name, with the geometry of the two 1x1 convs.

    Attributes:
        first / last: the 1x1 convs before and after the row's k x k conv (narrowed to r1 outputs /
            r2 inputs by the merge).
        bn1 / bn2: the BatchNorms between them (resized to r1 / r2 channels).
        act1 / act2: the activation on each side (the torch function's name), or None: a side
            without activation is merged exactly; across an activation the merge is approximate.
        bn3: a BatchNorm that alone reads `last`'s output, or None (constants fold into it).
        first_shape / last_shape: {"out", "in", "kernel"} of the two 1x1 convs before merging.
        first_stride: the first conv's stride.
    """

    first: str
    bn1: str
    bn2: str
    last: str
    first_shape: dict
    last_shape: dict
    act1: str | None = None
    act2: str | None = None
    bn3: str | None = None
    first_stride: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "first_stride", tuple(self.first_stride))

    @property
    def convs(self) -> tuple[str, str]:
        return self.first, self.last

    def module_names(self) -> list[str]:
        """Every module the merge replaces besides the row's own conv."""
        return [self.first, self.bn1, self.bn2, self.last]


@dataclass
class LayerPlan:
    """One candidate layer: what happens to it and why.

    Attributes:
        name: qualified module name in the model.
        kind: "svd", "tucker2", "tucker2_branched", "merged", "narrow" or "keep".
        rank: int for SVD, the kept width for narrow, (rank_in, rank_out) for Tucker-2, branched and merged rows, None for keep.
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
        branches: the core's groups for "tucker2_branched" (>= 2; ranks are multiples of it), else 1.
        merge: for "merged" rows, the absorbed neighbours (a MergeBlock); else None. Counts of a
            merged row cover the three convs (per output position of the row's conv).
        merge_skipped: why the merge candidate centred on this conv was not merged (None if it
            was, or if the conv is no candidate).
        narrow: for "narrow" rows, the consumer of the narrowed width (a NarrowPair); else None.
            Counts of a narrow row cover producer and consumer.
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
    branches: int = 1
    merge: MergeBlock | None = None
    merge_skipped: str | None = None
    narrow: NarrowPair | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        self.stride = tuple(self.stride)
        self.rank = _as_rank(self.rank, self.name)
        self.ratio_rank = _as_rank(self.ratio_rank, self.name)
        if isinstance(self.merge, Mapping):
            self.merge = MergeBlock(**self.merge)
        if isinstance(self.narrow, Mapping):
            self.narrow = NarrowPair(**self.narrow)
        self._check_form()
        self.params_before, self.macs_before, self.params_after, self.macs_after = row_cost(self)

    def _check_form(self) -> None:
        """The form fields agree with the kind (the rank's own bounds are the layer's to check)."""
        if (self.kind == "tucker2_branched") != (self.branches != 1):
            raise ValueError(f"layer {self.name!r}: branches must be >= 2 for kind 'tucker2_branched' and 1 "
                             f"otherwise, got {self.branches!r} for kind {self.kind!r}")
        if self.kind == "tucker2_branched" and self.rank is not None and any(r % self.branches for r in self.rank):
            raise ValueError(f"layer {self.name!r}: branched ranks must be multiples of {self.branches} "
                             f"branches, got {self.rank}")
        if (self.kind == "merged") != (self.merge is not None):
            raise ValueError(f"layer {self.name!r}: a 'merged' row needs its merge block and no other kind has "
                             f"one (kind {self.kind!r}, merge {self.merge!r})")
        if (self.kind == "narrow") != (self.narrow is not None):
            raise ValueError(f"layer {self.name!r}: a 'narrow' row needs its consumer and no other kind has one "
                             f"(kind {self.kind!r}, narrow {self.narrow!r})")

    @property
    def decomposed(self) -> bool:
        """True where the row changes the model (any kind but keep)."""
        return self.kind != "keep"

    def with_rank(self, rank: Rank, reason: str, kind: str | None = None,
                  branches: int | None = None) -> "LayerPlan":
        """A copy at another rank (or kept, or in another form: kind "tucker2_branched" takes
        `branches`), with counts recomputed; a merged row keeps its block, other kinds drop it.

        Raises:
            ValueError: a rank or branch count the new kind does not allow.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(rank=rank, reason=reason, kind=kind or self.kind)
        if values["kind"] == "keep":
            values["rank"] = None
        if branches is not None:
            values["branches"] = branches
        elif values["kind"] != "tucker2_branched":
            values["branches"] = 1
        if values["kind"] != "merged":
            values["merge"] = None
        if values["kind"] != "narrow":
            values["narrow"] = None
        return LayerPlan(**values)


def row_cost(row: LayerPlan) -> tuple[int, int, int, int]:
    """(params_before, macs_before, params_after, macs_after) of a row: weights (biases excluded)
    and MACs per output position of the row's layer."""
    if row.kind == "merged":
        return merged_cost(row.shape, row.stride, row.merge, row.rank)
    if row.kind == "narrow":
        return narrow_cost(row.shape, row.narrow, row.rank)
    before = weight_params(row.shape)
    if row.kind == "tucker2_branched":
        c_out, c_in, area = row.shape["out"], row.shape["in"], math.prod(row.shape["kernel"])
        (r_in, r_out), positions = row.rank, row.stride[0] * row.stride[1]
        params = branched_params(c_in, c_out, area, r_in, r_out, row.branches)
        return before, before, params, params + c_in * r_in * (positions - 1)
    return (before, before, *layer_cost(row.kind, row.rank, row.shape, row.stride))


def merged_cost(shape: dict, stride: tuple[int, int], block: MergeBlock, rank: Rank) -> tuple[int, int, int, int]:
    """Counts of a merged bottleneck before and after, per output position of its k x k conv: the
    first 1x1 runs at that conv's input resolution (stride_h * stride_w positions per output one)."""
    area, positions = math.prod(shape["kernel"]), stride[0] * stride[1]
    c_in, c_out = block.first_shape["in"], block.last_shape["out"]
    middle_in, middle_out = shape["in"], shape["out"]
    params_before = c_in * middle_in + area * middle_in * middle_out + middle_out * c_out
    macs_before = c_in * middle_in * positions + area * middle_in * middle_out + middle_out * c_out
    if rank is None:
        return params_before, macs_before, params_before, macs_before
    r_in, r_out = rank
    params_after = c_in * r_in + area * r_in * r_out + r_out * c_out
    return params_before, macs_before, params_after, c_in * r_in * positions + area * r_in * r_out + r_out * c_out


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
        block = self.absorbed().get(name)
        if block is not None:
            how = "narrowed with" if any(name in row.narrow.module_names() for row in self.narrowed) else "merged into"
            raise KeyError(f"no row {name!r} in the plan: it is {how} the row {block!r}")
        raise KeyError(f"no layer {name!r} in the plan")

    def replace(self, row: LayerPlan) -> "Plan":
        """A new plan with `row` in place of the row of the same name."""
        layers = [row if r.name == row.name else r for r in self.layers]
        return Plan(layers, ratio=self.ratio, beta=self.beta, meta=dict(self.meta))

    @property
    def decomposed(self) -> list[LayerPlan]:
        """Rows that replace one layer by the decomposition of its type ("svd", "tucker2"): the rows
        rank optimization searches. Branched and merged rows are in `changed`."""
        return [row for row in self.layers if row.kind in LAYER_KINDS]

    @property
    def changed(self) -> list[LayerPlan]:
        """Every row that changes the model: decomposed, branched and merged."""
        return [row for row in self.layers if row.decomposed]

    @property
    def merged(self) -> list[LayerPlan]:
        return [row for row in self.layers if row.kind == "merged"]

    @property
    def narrowed(self) -> list[LayerPlan]:
        return [row for row in self.layers if row.kind == "narrow"]

    def absorbed(self) -> dict[str, str]:
        """Module name of each conv a merged row absorbed, and of each narrowed width's consumer,
        -> that row's name."""
        absorbed = {conv: row.name for row in self.merged for conv in row.merge.convs}
        return absorbed | {name: row.name for row in self.narrowed for name in row.narrow.module_names()}

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
        check_plan_fields(data, source)
        rows = []
        for i, raw in enumerate(data["layers"]):
            where, values = row_fields(raw, f"{source}: layer {i}")
            try:
                rows.append(LayerPlan(**values))
            except ValueError as error:  # the fields disagree with each other (kind vs branches / merge)
                raise ValueError(f"{where}: {error}") from None
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
        """Written whole or not at all (atomically; missing folders created)."""
        text = self.to_json() + "\n"
        atomic_write(path, lambda temporary: Path(temporary).write_text(text))

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
            if row.kind == "tucker2_branched":
                rank += f"/{row.branches}"
            params = f"{row.params_before:,} -> {row.params_after:,}" if row.decomposed else f"{row.params_before:,}"
            reason = row.reason if row.merge_skipped is None else f"{row.reason}; not merged: {row.merge_skipped}"
            lines.append((row.name, row.layer_type, shape, row.kind, rank, params, reason))
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        t = self.totals()
        saved = 1 - t["params_after"] / t["params_before"] if t["params_before"] else 0.0
        merged, narrowed = len(self.merged), len(self.narrowed)
        footer = (
            f"{len(self.changed) - merged - narrowed}/{len(self.layers)} layers decomposed"
            + (f", {merged} bottlenecks merged (3 convs each)" if merged else "")
            + (f", {narrowed} widths narrowed (producer and consumer each)" if narrowed else "")
            + f"; candidate-layer weights {t['params_before']:,} -> {t['params_after']:,} ({saved:.1%} fewer)"
        )
        return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines] + [footer])
