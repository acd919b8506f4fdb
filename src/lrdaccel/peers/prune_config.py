"""What `peers.prune` is asked for (PruneConfig) and what it did (PruneReport).

The budget is one of five fields, so that a pruned peer can be matched to an LRD variant on the
axis the comparison needs: a fixed pruning ratio, a parameter count (absolute or a fraction of
the model's), or an inference time (absolute seconds per call or a fraction of the original's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lrdaccel._settings import check_choice, check_int, check_number

IMPORTANCES = ("magnitude", "taylor")
BUDGETS = ("pruning_ratio", "target_params", "params_fraction", "target_latency", "latency_fraction")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of `lrdaccel.peers.prune`; give exactly one budget field.

    Attributes:
        pruning_ratio: prune this fraction of every prunable group's channels (and of each
            attention module's heads), no search; 0 prunes nothing.
        target_params: search the ratio until the whole pruned model has this many parameters
            (within `tolerance`).
        params_fraction: the same, as a fraction (0, 1) of the model's parameters.
        target_latency: search the ratio until one inference call on the example inputs takes
            this many seconds (within `latency_tolerance`), timed interleaved with the original.
        latency_fraction: the same, as a fraction (0, 1) of the original's time.
        importance: "magnitude" (group L`norm` of the weights) or "taylor" (|weight x gradient|
            of a loss: pass `loss_fn` to prune).
        norm: 1 or 2, the norm of "magnitude".
        tolerance: relative distance to a parameter target that counts as matched (0.02: 2%).
        latency_tolerance: the same for a time target (timings are noisy; 0.05 by default).
        max_ratio: the largest pruning ratio the search tries (every group keeps at least
            1 - max_ratio of its channels, every attention module at least one head).
        global_pruning: rank channels across all groups (torch-pruning's global pruning) instead
            of the same ratio in every group.
        round_to: keep channel counts multiples of this (hardware-friendly widths), or None.
        keep_stem: leave the output width of the first conv the model calls (the stem).
        max_trials: pruned copies the search may build before giving up.
        latency_repeats: interleaved timing repeats per trial of a time target.
        min_run_time: seconds of timed calls per measurement of a time target.
    """

    pruning_ratio: float | None = None
    target_params: int | None = None
    params_fraction: float | None = None
    target_latency: float | None = None
    latency_fraction: float | None = None
    importance: str = "magnitude"
    norm: int = 2
    tolerance: float = 0.02
    latency_tolerance: float = 0.05
    max_ratio: float = 0.9
    global_pruning: bool = False
    round_to: int | None = None
    keep_stem: bool = True
    max_trials: int = 30
    latency_repeats: int = 3
    min_run_time: float = 0.2

    def __post_init__(self) -> None:
        given = [name for name in BUDGETS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget of {BUDGETS}, got {given or 'none'}")
        check_number("pruning_ratio", self.pruning_ratio, at_least=0, optional=True)
        if self.pruning_ratio is not None and self.pruning_ratio >= 1:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {self.pruning_ratio!r}")
        check_int("target_params", self.target_params, 1, optional=True)
        for name in ("params_fraction", "latency_fraction"):
            value = getattr(self, name)
            check_number(name, value, above=0, optional=True)
            if value is not None and value >= 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        check_number("target_latency", self.target_latency, above=0, optional=True)
        check_choice("importance", self.importance, IMPORTANCES)
        check_int("norm", self.norm, 1)
        check_choice("norm", self.norm, (1, 2))
        check_number("tolerance", self.tolerance, above=0, at_most=0.5)
        check_number("latency_tolerance", self.latency_tolerance, above=0, at_most=0.5)
        check_number("max_ratio", self.max_ratio, above=0)
        if self.max_ratio >= 1:
            raise ValueError(f"max_ratio must be in (0, 1), got {self.max_ratio!r}")
        if self.pruning_ratio is not None and self.pruning_ratio > self.max_ratio:
            raise ValueError(f"pruning_ratio {self.pruning_ratio!r} is above max_ratio {self.max_ratio!r}")
        _check_bool("global_pruning", self.global_pruning)
        check_int("round_to", self.round_to, 1, optional=True)
        _check_bool("keep_stem", self.keep_stem)
        check_int("max_trials", self.max_trials, 2)
        check_int("latency_repeats", self.latency_repeats, 1)
        check_number("min_run_time", self.min_run_time, above=0)

    @property
    def timed(self) -> bool:
        """A time budget (the search times every trial)."""
        return self.target_latency is not None or self.latency_fraction is not None


def _check_bool(what: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")


@dataclass
class PruneReport:
    """What one `prune` call did; numbers first, `str(report)` prints them.

    Attributes:
        model: the model's class name.
        importance: "magnitude (L2)", "taylor", ...
        pruning_ratio: the ratio the returned copy was pruned at (the search's answer).
        params_before, params_after: every parameter of the model and of the pruned copy.
        target_params: the parameter count asked for (None for a time budget or a fixed ratio).
        latency_fraction: the pruned copy's inference time / the original's, measured
            interleaved (only for a time budget).
        seconds: wall time of the whole call.
        kept: layer name -> why its output width was left as it was.
        heads: attention module -> (heads before, heads after).
        trials: every ratio the search tried, with the parameters (and time fraction) it gave.
    """

    model: str
    importance: str
    pruning_ratio: float
    params_before: int
    params_after: int
    target_params: int | None = None
    latency_fraction: float | None = None
    seconds: float = 0.0
    kept: dict[str, str] = field(default_factory=dict)
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        return {"model": self.model, "importance": self.importance, "pruning_ratio": self.pruning_ratio,
                "params_before": self.params_before, "params_after": self.params_after,
                "params_fraction": self.params_fraction, "target_params": self.target_params,
                "latency_fraction": self.latency_fraction, "seconds": self.seconds, "kept": dict(self.kept),
                "heads": {k: list(v) for k, v in self.heads.items()}, "trials": list(self.trials)}

    def __str__(self) -> str:
        lines = [f"{self.model} pruned ({self.importance}) at ratio {self.pruning_ratio:.4f}: "
                 f"{self.params_before:,} -> {self.params_after:,} params ({self.params_fraction:.3f}x)"
                 + (f", target {self.target_params:,}" if self.target_params is not None else "")
                 + (f", {self.latency_fraction:.3f}x the original's time" if self.latency_fraction is not None else "")
                 + f"; {len(self.trials)} trial(s), {self.seconds:.1f} s"]
        if self.heads:
            before = sum(b for b, _ in self.heads.values())
            after = sum(a for _, a in self.heads.values())
            lines.append(f"  attention heads: {before} -> {after} in {len(self.heads)} modules")
        for name, reason in self.kept.items():
            lines.append(f"  kept {name}: {reason}")
        return "\n".join(lines)
