"""Which rank to use for one layer, from measured times: the search and its two rules.

Arithmetic on ranks, parameter counts and times only; how a time is measured (and cached, and
bounded) is the caller's `measure` function.

Rules:
    "tradeoff" (default): score each candidate c against the ratio rank R by
        score(c) = (t(R) - t(c)) / t(R)  -  tradeoff * (P(R) - P(c)) / P(R)
    (relative time saved minus relative parameters given up) and take the best, if it beats R
    by more than `min_gain` (measurement noise). On a staircase that snaps to the step; on a
    smooth curve time saved never pays for the capacity lost, so R stays. On a plan allocated
    by sensitivity (`lrd.plan(..., allocate="sensitivity")`), what a rank gives up is the
    relative rise of the layer's measured loss instead, (L(c) - L(R)) / L(R), wherever the plan
    holds L at both ranks (every SVD rank and the Tucker-2 line within a factor 2 of R; ranks
    off the line are scored by parameters): time is then traded against what the model loses,
    not against parameter count.
    "paper" (arXiv 2407.20266, Algorithm 1): from R down to a lower bound, find the largest drop
    in time between neighbouring ranks and take the rank just below it. Never above R. Ranks are
    timed by 8 first (every rank in short ranges), then every rank inside the largest drop until
    it lies between neighbours.
Either way the original layer is kept where the chosen decomposition is not faster than it.

Under the compiled runtimes only aligned ranks are candidates (the ratio rank is still timed, as
the reference): multiples of 8 under "onnxruntime", of 16 under "compile". Both run convs in
blocked channel layouts (ONNX Runtime's NCHWc, oneDNN's 16-channel blocks on AVX-512), and an
unaligned channel count costs padding or layout reorders between layers that a layer timed alone
cannot show. Measured on HF ResNet-50 at ratio 2, batch 8, one thread: under onnxruntime
0.97-0.99x over the original at the ratio ranks, 1.86-1.89x with ranks searched among multiples
of 8; under compile 1.71x searched freely and 1.78x among multiples of 16 (a busy machine; issue
10 measured 2.32x with every rank floored to a multiple of 32 there). Fewer candidates also keep
the compiled search short.

Candidates: hardware-friendly ranks first (multiples of 64, 32, 16, then 8, nearest R first),
then every rank within 7 of the best. Tucker-2 walks the line r_out = beta * r_in, then lets
each side grow alone into the parameter budget, then refines each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.factorize.ranks import Rank
from lrdaccel.measure.runtimes import check_compile_mode, check_runtime
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.planning import LayerPlan

RULES = ("tradeoff", "paper")
RANK_STEP = {"onnxruntime": 8, "compile": 16}  # runtimes whose candidate ranks must be multiples of a step
REFINE = 7  # phase 1 steps by 8, so +-7 around the best reaches every rank between neighbours

Measure = Callable[..., "float | None"]
"""measure(rank, required=False) -> ms, or None once the layer's time budget is spent
(never None when required). rank None means the original layer."""


@dataclass(frozen=True)
class SearchSettings:
    """How `optimize_ranks` chooses ranks.

    Attributes:
        objective: what to make faster: "infer" (forward under inference mode) or "train"
            (forward + backward).
        runtime: what the model will run in, and so what each layer is timed in: "eager",
            "compile" (torch.compile, inductor, freezing for inference) or "onnxruntime"
            (inference only; pip install lrdaccel[onnx]).
        rule: "tradeoff" (score time saved against parameters given up) or "paper" (Algorithm 1).
        tradeoff: weight of relative parameters given up (on an allocated plan: relative rise
            of the layer's measured loss) against relative time saved; >= 0.
        max_growth: try ranks with up to this fraction more parameters than the ratio rank
            (0: never more than the ratio allows); >= 0. Ignored by the paper's rule.
        lowest: search down to this fraction of the ratio rank; in (0, 1].
        min_gain: a candidate must beat the ratio rank's score by more than this (noise margin).
        budget_s: seconds of measuring per distinct layer; the original and the ratio rank are
            always measured. None: no bound.
        min_run_time: seconds of repeated calls per layer measurement (the default timer's).
        try_branches: Tucker-2 layers also try cores of 2, 4, ... up to this many branches
            (lrd.BranchedTuckerConv2d) within the parameters of the rank chosen, and take the
            fastest where it beats plain Tucker-2 by more than min_gain; 1: plain Tucker-2 only.
            A branched core is another approximation, not a re-parametrisation.
        compile_mode: torch.compile's mode under runtime "compile" ("default", "reduce-overhead",
            "max-autotune", "max-autotune-no-cudagraphs"): each candidate is compiled as the model
            will be. Ignored by the other runtimes.
    """

    objective: str = "infer"
    runtime: str = "eager"
    rule: str = "tradeoff"
    tradeoff: float = 1.0
    max_growth: float = 0.0
    lowest: float = 0.5
    min_gain: float = 0.02
    budget_s: float | None = 20.0
    min_run_time: float = 0.2
    try_branches: int = 1
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_runtime(self.runtime, self.objective)
        check_choice("rule", self.rule, RULES)
        for name in ("tradeoff", "max_growth", "min_gain"):
            check_number(name, getattr(self, name), at_least=0)
        check_number("lowest", self.lowest, above=0, at_most=1)
        check_number("budget_s", self.budget_s, above=0, optional=True)
        check_number("min_run_time", self.min_run_time, above=0)
        check_int("try_branches", self.try_branches, 1)
        check_compile_mode(self.compile_mode)


@dataclass
class Choice:
    """The outcome for one layer. rank None: keep the original layer."""

    rank: Rank
    time_ms: float
    time_original_ms: float
    time_ratio_rank_ms: float
    reason: str
    times: dict = field(default_factory=dict)  # every measured rank -> ms
    cut_by_budget: bool = False
    form: str | None = None  # the execution form where not the layer's default (rankopt.forms)
    branches: int = 1  # > 1: a branched Tucker-2 core (rankopt.forms.choose_branches)


class _Space:
    """The ranks allowed for one layer, their parameter counts, and the measurements so far."""

    def __init__(self, row: LayerPlan, beta: float, settings: SearchSettings, measure: Measure,
                 sensitivity: dict | None = None):
        self.row, self.beta, self.settings, self._measure = row, beta, settings, measure
        record = sensitivity or {}
        self.losses = {tuple(r) if isinstance(r, list) else r: loss
                       for r, loss in zip(record.get("ranks", []), record.get("loss", []))}
        self.ratio_rank = row.ratio_rank if row.ratio_rank is not None else row.rank
        self.tucker = row.kind in ("tucker2", "merged")  # a pair of ranks
        self.limits = (row.shape["in"], row.shape["out"]) if self.tucker else (min(row.shape["in"], row.shape["out"]),)
        ratio_ranks = self.ratio_rank if self.tucker else (self.ratio_rank,)
        self.lows = tuple(max(1, math.ceil(r * settings.lowest)) for r in ratio_ranks)
        self.params_ratio = self.params(self.ratio_rank)
        self.step = RANK_STEP.get(settings.runtime, 1)
        growth = 0.0 if settings.rule == "paper" else settings.max_growth
        self.params_budget = self.params_ratio * (1 + growth)
        self.times: dict = {}
        self.cut = False

    def params(self, rank: Rank) -> int:
        return self.row.with_rank(rank, "").params_after

    def aligned(self, rank: Rank) -> bool:
        """Every side a multiple of the runtime's step (or the full channel count)."""
        ranks = rank if self.tucker else (rank,)
        return all(r % self.step == 0 or r == limit for r, limit in zip(ranks, self.limits))

    def allowed(self, rank: Rank) -> bool:
        """Within [lowest * R, channels], the parameter budget, cheaper in MACs than the original,
        and aligned to the runtime's step."""
        ranks = rank if self.tucker else (rank,)
        if any(not low <= r <= limit for r, low, limit in zip(ranks, self.lows, self.limits)):
            return False
        if rank == self.ratio_rank:
            return True
        if not self.aligned(rank):
            return False
        candidate = self.row.with_rank(rank, "")
        return candidate.params_after <= self.params_budget and candidate.macs_after < candidate.macs_before

    def measure(self, ranks: Iterable[Rank]) -> None:
        """Time each allowed rank not yet timed, in order, until the budget runs out."""
        for rank in ranks:
            if self.cut:
                return
            if rank in self.times or not self.allowed(rank):
                continue
            ms = self._measure(rank)
            if ms is None:
                self.cut = True
                return
            self.times[rank] = ms

    # The beta line: Tucker-2 ranks as one number t -> (rank_in, rank_out); SVD ranks are t itself.
    def on_line(self, t: int) -> Rank:
        if not self.tucker:
            return t
        c_in, c_out = self.limits
        return min(t, c_in), max(1, min(math.floor(self.beta * t), c_out))

    def line_position(self) -> int:
        if not self.tucker:
            return self.ratio_rank
        r_in, r_out = self.ratio_rank
        return max(r_in, round(r_out / self.beta))

    def line_range(self) -> tuple[int, int]:
        """(lowest, highest) t on the line worth trying."""
        t_ratio = self.line_position()
        low = max(1, math.ceil(t_ratio * self.settings.lowest))
        high = t = t_ratio
        top = max(self.limits) if not self.tucker else max(self.limits[0], math.ceil(self.limits[1] / self.beta))
        while t < top:  # up the line while the budget allows, stepping over unaligned ranks
            t += 1
            if not self.aligned(self.on_line(t)):
                continue
            if not self.allowed(self.on_line(t)):
                break
            high = t
        return low, high


def alignment(value: int) -> int:
    """The largest of 64, 32, 16, 8 that divides `value`, else 1."""
    for step in (64, 32, 16, 8):
        if value % step == 0:
            return step
    return 1


def _friendly_first(values: Iterable[int], centre: int) -> list[int]:
    return sorted(set(values), key=lambda v: (-alignment(v), abs(v - centre), -v))


def search_rank(row: LayerPlan, measure: Measure, settings: SearchSettings, beta: float = 1.0,
                sensitivity: dict | None = None) -> Choice:
    """Choose the rank of one decomposed layer from measured times.

    Args:
        row: the layer's plan row (kind svd, tucker2 or merged; ratio_rank or rank is the starting rank R).
        measure: see `Measure`.
        settings: the rule and its bounds.
        beta: Tucker-2 rank_out / rank_in of the plan (the line searched first).
        sensitivity: the layer's record in an allocated plan's meta["sensitivity"] (ranks and
            their losses): what a rank gives up is then scored by loss, not parameters.

    Returns:
        A Choice: rank (None to keep the original), its time, the times of the original and of
        R, a reason, and every time measured.
    """
    space = _Space(row, beta, settings, measure, sensitivity)
    original = measure(None, required=True)
    at_ratio = measure(space.ratio_rank, required=True)
    space.times[space.ratio_rank] = at_ratio
    if settings.rule == "paper":
        rank, why = _paper_rule(space)
    else:
        rank, why = _tradeoff_rule(space)
    if not space.aligned(rank):
        rank, why = _aligned_instead(space, rank, why)
    time_ms = space.times[rank]
    count = len(space.times)
    notes = f"; {count} rank{'' if count == 1 else 's'} timed"
    if space.cut:
        notes += f", cut by the {settings.budget_s:g} s budget"
    if time_ms >= original:
        reason = (f"kept: best decomposition ({_fmt(rank)}, {time_ms:.3g} ms) is not faster than the "
                  f"original ({original:.3g} ms){notes}")
        return Choice(None, original, original, at_ratio, reason, dict(space.times), space.cut)
    reason = f"{why}; {original / time_ms:.2f}x faster than the original{notes}"
    return Choice(rank, time_ms, original, at_ratio, reason, dict(space.times), space.cut)


def _aligned_instead(space: _Space, rank: Rank, why: str) -> tuple[Rank, str]:
    """The best-scoring aligned rank measured, where the rule picked an unaligned ratio rank."""
    aligned = [r for r in space.times if space.aligned(r)]
    if not aligned:
        return rank, f"{why}; no rank aligned to {space.step} was timed"
    best = max(aligned, key=lambda r: (_score(space, r, space.settings.tradeoff), space.params(r)))
    return best, (f"rank {_fmt(best)}: the best rank aligned to {space.step} ({space.settings.runtime} runs "
                  f"convs in blocked channel layouts; ratio rank {_fmt(space.ratio_rank)} is not aligned), "
                  f"score {_score(space, best, space.settings.tradeoff):+.3f}")


def _score(space: _Space, rank: Rank, tradeoff: float) -> float:
    t_ratio = space.times[space.ratio_rank]
    saved = (t_ratio - space.times[rank]) / t_ratio
    return saved - tradeoff * _given_up(space, rank)


def _given_up(space: _Space, rank: Rank) -> float:
    """The relative rise of the layer's measured loss from the ratio rank where the plan has it
    at both ranks, else the relative parameters given up."""
    base = space.losses.get(space.ratio_rank)
    if base and rank in space.losses:
        return (space.losses[rank] - base) / base
    return (space.params_ratio - space.params(rank)) / space.params_ratio


def _best(space: _Space) -> Rank:
    """Highest score; ties go to more parameters."""
    tradeoff = space.settings.tradeoff
    return max(space.times, key=lambda r: (_score(space, r, tradeoff), space.params(r)))


def _tradeoff_rule(space: _Space) -> tuple[Rank, str]:
    low, high = space.line_range()
    centre = space.line_position()
    line = [t for t in range(low, high + 1) if alignment(t) >= 8] + [high]
    space.measure(space.on_line(t) for t in _friendly_first(line, centre))
    if space.tucker:
        space.measure(_grow_alone(space, _best(space)))
        best = _best(space)
        space.measure(_refine(space, best, axis=0))
        best = _best(space)
        space.measure(_refine(space, best, axis=1))
    else:
        space.measure(_refine(space, _best(space), axis=0))
    others = [rank for rank in space.times if rank != space.ratio_rank]
    best = _best(space)
    score = _score(space, best, space.settings.tradeoff)
    if best == space.ratio_rank or score <= space.settings.min_gain:
        runner_up = max(others, key=lambda r: _score(space, r, space.settings.tradeoff), default=None)
        detail = "" if runner_up is None else (
            f" (best other: {_fmt(runner_up)}, {_score(space, runner_up, space.settings.tradeoff):+.3f})")
        return space.ratio_rank, (f"ratio rank {_fmt(space.ratio_rank)} kept: no other rank scored above "
                                  f"+{space.settings.min_gain:g}{detail}")
    t_ratio, t_best = space.times[space.ratio_rank], space.times[best]
    params_change = space.params(best) / space.params_ratio - 1
    loss = (f", {_given_up(space, best):+.1%} loss" if space.losses.get(space.ratio_rank) and best in space.losses
            else "")
    return best, (f"rank {_fmt(best)} (ratio rank {_fmt(space.ratio_rank)}): {1 - t_best / t_ratio:+.1%} time "
                  f"saved for {params_change:+.1%} params{loss}, score {score:+.3f}")


def _grow_alone(space: _Space, best: Rank) -> list[Rank]:
    """Tucker-2: from `best`, each side grown alone to the largest friendly rank the budget allows."""
    grown = []
    for axis in (0, 1):
        rank = list(best)
        top = value = best[axis]
        while value < space.limits[axis]:  # stepping over values the runtime's alignment rules out
            value += 1
            rank[axis] = value
            if value % space.step and value != space.limits[axis]:
                continue
            if not space.allowed(tuple(rank)):
                break
            top = value
        rank[axis] = top - top % 8 if top >= 8 else top
        grown += [tuple(rank)]
        rank[axis] = top
        grown += [tuple(rank)]
    return grown


def _refine(space: _Space, best: Rank, axis: int) -> list[Rank]:
    """Every rank within REFINE of `best` along one axis, friendly ranks first."""
    centre = best if not space.tucker else best[axis]
    values = _friendly_first(range(max(1, centre - REFINE), centre + REFINE + 1), centre)
    if not space.tucker:
        return values
    return [tuple(v if i == axis else best[i] for i in (0, 1)) for v in values]


def _paper_rule(space: _Space) -> tuple[Rank, str]:
    """Largest time drop going down from R; the rank just below it. Coarse by 8, then every rank."""
    low, _ = space.line_range()
    high = space.line_position()
    coarse = [t for t in range(low, high) if alignment(t) >= 8 or high - low <= 2 * REFINE]
    space.measure(space.on_line(t) for t in _friendly_first(coarse, high))
    drop = _largest_drop(space)
    # Narrow the largest drop to neighbouring ranks (the paper times every rank; this times those that matter).
    while drop is not None and not space.cut and _line_t(space, drop[0]) - _line_t(space, drop[1]) > 1:
        upper, lower, _ = drop
        timed = len(space.times)
        space.measure(space.on_line(t) for t in range(_line_t(space, upper) - 1, _line_t(space, lower), -1))
        if len(space.times) == timed:  # nothing between them may be timed (bounds): the drop is as narrow as it gets
            break
        drop = _largest_drop(space)
    if drop is None:
        return space.ratio_rank, f"paper rule: time never falls below the ratio rank {_fmt(space.ratio_rank)}'s"
    upper, lower, ms = drop
    return lower, f"paper rule: largest time drop ({ms:.3g} ms) from rank {_fmt(upper)} to {_fmt(lower)}"


def _line_t(space: _Space, rank: Rank) -> int:
    if not space.tucker:
        return rank
    r_in, r_out = rank
    return max(r_in, round(r_out / space.beta))


def _largest_drop(space: _Space) -> tuple[Rank, Rank, float] | None:
    """(upper, lower, ms) for the largest positive time drop between neighbouring measured ranks."""
    ranks = sorted(space.times, key=lambda r: _line_t(space, r), reverse=True)
    drops = [(space.times[a] - space.times[b], a, b) for a, b in zip(ranks, ranks[1:])]
    positive = [d for d in drops if d[0] > 0]
    if not positive:
        return None
    ms, upper, lower = max(positive, key=lambda d: d[0])
    return upper, lower, ms


def _fmt(rank: Rank) -> str:
    return str(rank) if not isinstance(rank, tuple) else "{}x{}".format(*rank)
