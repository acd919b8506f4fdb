"""Which layers to decompose, at which ranks, and why: a `Plan` of `LayerPlan` rows.

`plan()` only reads the model. Every candidate layer (Linear, HF Conv1D, Conv2d) gets a row;
those not decomposed are `kind="keep"` with the reason, so a user can see why a layer stayed.
A plan round-trips through JSON and is checked against the model it is applied to.

Example:
    >>> import torch, lrdaccel as lrd
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> p = lrd.plan(model, ratio=2.0)
    >>> [(row.name, row.kind, row.rank) for row in p]
    [('0', 'svd', 16), ('2', 'keep', None)]
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping

from torch import nn

from lrdaccel._modules import direct_reader, unwrap, weight_owners
from lrdaccel._targeting import Selector, compile_selector
from lrdaccel.factorize import svd_params, svd_rank, tucker2_params, tucker2_ranks
from lrdaccel.layers import LowRankModule, entry_for
from lrdaccel.layers.registry import dense_shape, weight_params

PLAN_FORMAT = "lrdaccel.plan"
PLAN_VERSION = 1
KINDS = ("svd", "tucker2", "keep")

Rank = int | tuple[int, int] | None


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
        self.params_after, self.macs_after = _cost(self.kind, self.rank, self.shape, self.stride)

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


def _cost(kind: str, rank: Rank, shape: dict, stride: tuple[int, int]) -> tuple[int, int]:
    """(weight params, MACs per output position) of a layer decomposed as `kind` at `rank`."""
    c_out, c_in, area = shape["out"], shape["in"], math.prod(shape["kernel"])
    if kind == "keep":
        return c_out * c_in * area, c_out * c_in * area
    if kind == "svd":
        params = svd_params(c_out, c_in, rank)
        return params, params
    r_in, r_out = rank
    params = tucker2_params(c_in, c_out, area, r_in, r_out)
    # The input 1x1 runs at input resolution: stride_h*stride_w positions per output position.
    macs = c_in * r_in * stride[0] * stride[1] + area * r_in * r_out + r_out * c_out
    return params, macs


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
        from lrdaccel import __version__

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
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{source}: not an lrdaccel plan (missing format={PLAN_FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise ValueError(f"{source}: plan version {version!r} is newer than this lrdaccel reads "
                             f"({PLAN_VERSION}); upgrade lrdaccel")
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


def plan(
    model: nn.Module,
    ratio: float = 2.0,
    *,
    ratios: Mapping[str, float] | None = None,
    ranks: Mapping[str, Rank] | str | None = None,
    include: Selector = None,
    exclude: Selector = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_rank: int = 8,
    beta: float = 1.0,
) -> Plan:
    """Plan the decomposition of `model` without changing it.

    Args:
        model: the trained model (DDP / torch.compile wrappers are looked through).
        ratio: per-layer compression ratio, original weight params / decomposed; > 1.
        ratios: per-layer ratios by exact name or dotted suffix, overriding `ratio`.
        ranks: explicit ranks by name or suffix (int, or (rank_in, rank_out) for Tucker-2), or
            "full" for every candidate at full rank (an exact re-parametrisation, for checks).
            Explicit ranks are honoured even where they do not save MACs.
        include / exclude: a full regex on the module name, a list of names or dotted suffixes,
            or a callable (module, name) -> bool. Exclusion wins.
        filter_fn: an extra callable (module, name) -> bool every decomposed layer must pass.
        min_rank: a layer whose ratio rank falls below this (or below its channel count, where
            that is smaller) is kept: it saves few parameters and loses much, like a 1-channel
            image stem at Tucker ranks (1, 2). Explicit `ranks` are exempt.
        beta: Tucker-2 rank_out / rank_in.

    Raises:
        ValueError: ratio <= 1, a bad rank, or a name pattern that matches no candidate.
    """
    model = unwrap(model)
    _check_ratio_value("ratio", ratio)
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    candidates, already = _candidates(model)
    names = [name for name, _ in candidates]
    included = compile_selector(include, "include", names)
    excluded = compile_selector(exclude, "exclude", names)
    per_layer_ratio = _resolve_per_layer("ratios", ratios, names)
    for name, value in per_layer_ratio.items():
        _check_ratio_value(f"ratios[{name!r}]", value)
    full_rank = ranks == "full"
    per_layer_rank = {} if full_rank else _resolve_per_layer("ranks", ranks, names)
    owners = weight_owners(model)

    rows = [LayerPlan(name, "keep", None, "already decomposed", type(m).__name__, _low_rank_shape(m))
            for name, m in already]
    for name, module in candidates:
        entry = entry_for(module)
        shape = dense_shape(module)
        stride = tuple(module.stride) if isinstance(module, nn.Conv2d) else (1, 1)

        def keep(reason: str) -> LayerPlan:
            return LayerPlan(name, "keep", None, reason, type(module).__name__, shape, stride)

        sharers = [o for o in owners[id(module.weight)] if o != name]
        reader = direct_reader(model, name)
        if excluded is not None and excluded(module, name):
            rows.append(keep("excluded by user"))
        elif included is not None and not included(module, name):
            rows.append(keep("not in include"))
        elif filter_fn is not None and not filter_fn(module, name):
            rows.append(keep("rejected by filter_fn"))
        elif (why := entry.cannot(module)) is not None:
            rows.append(keep(why))
        elif reader is not None:
            rows.append(keep(f"weight read directly by parent {reader}"))
        elif sharers:
            rows.append(keep(f"weight shared with {', '.join(sharers)}"))
        elif full_rank or name in per_layer_rank:
            rank = _full_rank(entry.kind, shape) if full_rank else per_layer_rank[name]
            layer_class = entry.layer_class
            layer_class.like(module, rank, name)  # validates the rank against the shape
            rank = rank if entry.kind == "svd" else _tucker_pair(rank)
            reason = "full rank" if full_rank else "rank set by user"
            rows.append(LayerPlan(name, entry.kind, rank, reason, type(module).__name__, shape, stride, ratio_rank=rank))
        else:
            layer_ratio = per_layer_ratio.get(name, ratio)
            rank = _ratio_rank(entry.kind, shape, layer_ratio, beta)
            if _below_min_rank(rank, shape, min_rank):
                rows.append(keep(f"ratio {layer_ratio:g} gives rank {rank}, below min_rank {min_rank}"))
                continue
            row = LayerPlan(name, entry.kind, rank, f"ratio {layer_ratio:g}", type(module).__name__, shape, stride,
                            ratio_rank=rank)
            if row.macs_after >= row.macs_before:
                row = row.with_rank(None, f"rank {rank} does not reduce MACs "
                                          f"({row.macs_after:,} >= {row.macs_before:,} per position)", kind="keep")
            rows.append(row)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda row: order[row.name])
    return Plan(rows, ratio=ratio, beta=beta, meta={"model": type(model).__name__})


def _check_ratio_value(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"{what} must be a finite number > 1, got {value!r}")


def _candidates(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """Dense candidate layers, and already-decomposed layers (whose factors are not candidates)."""
    candidates, already = [], []
    inside = None  # named_modules is depth-first: skip the factors of the last low-rank module
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, LowRankModule):
            already.append((name, module))
            inside = name + "."
        elif entry_for(module) is not None and name:
            candidates.append((name, module))
    return candidates, already


def _low_rank_shape(module: LowRankModule) -> dict:
    return dense_shape(module.to_dense())


def _resolve_per_layer(what: str, mapping: Mapping | None, names: list[str]) -> dict:
    """Map each candidate name to its value; keys may be exact names or dotted suffixes."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must be a mapping of layer name -> value, got {type(mapping).__name__}")
    resolved = {}
    for key, value in mapping.items():
        hits = [n for n in names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"{what}: no candidate layer named {key!r}")
        for hit in hits:
            resolved[hit] = value
    return resolved


def _full_rank(kind: str, shape: dict) -> Rank:
    return min(shape["out"], shape["in"]) if kind == "svd" else (shape["in"], shape["out"])


def _tucker_pair(rank: Rank) -> tuple[int, int]:
    return (rank, rank) if isinstance(rank, int) else tuple(rank)


def _ratio_rank(kind: str, shape: dict, ratio: float, beta: float) -> Rank:
    """The ratio's rank, never above the channel counts (may be 0 for a tiny layer)."""
    c_out, c_in = shape["out"], shape["in"]
    if kind == "svd":
        return min(svd_rank(c_out, c_in, ratio), c_out, c_in)
    return tucker2_ranks(c_in, c_out, math.prod(shape["kernel"]), ratio, beta)


def _below_min_rank(rank: Rank, shape: dict, min_rank: int) -> bool:
    """True where a rank is under min_rank, unless it already spans its whole channel mode."""
    if isinstance(rank, int):
        return rank < min(min_rank, shape["out"], shape["in"])
    r_in, r_out = rank
    return r_in < min(min_rank, shape["in"]) or r_out < min(min_rank, shape["out"])
