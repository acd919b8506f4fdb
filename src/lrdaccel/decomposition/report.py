"""What `decompose` did, per layer and in total: data first, a table when printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrdaccel.planning import Plan


@dataclass
class LayerReport:
    """What decomposing one layer did. MACs are per forward of the example input when one was
    given (counted by torch.utils.flop_counter), else per output position (analytic)."""

    name: str
    kind: str
    rank: Any
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # ||W - W_hat||_F / ||W||_F; for a merged block, the relative error of the block's output on the
    # first calibration batch before BatchNorm re-estimation (None without calibration)
    relative_error: float | None


@dataclass
class DecomposeReport:
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    model_macs_before: int | None = None  # whole model, per forward of example_inputs
    model_macs_after: int | None = None
    macs_unit: str = "per output position"
    seconds: float = 0.0
    plan: Plan | None = field(default=None, repr=False)

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        return {k: sum(getattr(row, k) for row in self.layers) for k in keys}

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'kind':<8} {'rank':<10} {'params':>23} {'rel.err':>8}"]
        for r in self.layers:
            error = "-" if r.relative_error is None else f"{r.relative_error:.4f}"
            lines.append(f"{r.name:<40} {r.kind:<8} {str(r.rank):<10} "
                         f"{r.params_before:>10,} -> {r.params_after:>9,} {error:>8}")
        lines.append(f"model parameters: {self.model_params_before:,} -> {self.model_params_after:,}"
                     + (f" ({self.model_params_after / self.model_params_before:.3f}x)"
                        if self.model_params_before else ""))
        if self.model_macs_before:
            lines.append(f"model MACs per forward: {self.model_macs_before:,} -> {self.model_macs_after:,} "
                         f"({self.model_macs_after / self.model_macs_before:.3f}x)")
        lines.append(f"decomposed {len(self.layers)} layers in {self.seconds:.1f} s")
        return "\n".join(lines)
