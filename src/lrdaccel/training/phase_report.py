"""What trains in a freezing phase, as data (tests assert on it) with a printer on top."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseReport:
    """Which parameters train in one phase: data first (tests assert on it), a printer on top."""

    phase: int
    # decomposed layer (or merged block, by its inner conv) name -> indices of its factors that train
    layers: dict[str, tuple[int, ...]]
    trainable: tuple[str, ...]  # every parameter of the model that trains now, by name
    frozen: tuple[str, ...]  # every parameter that does not
    trainable_params: int
    total_params: int

    @property
    def share(self) -> float:
        """Trainable parameters / all parameters."""
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (f"phase {self.phase}: {self.trainable_params:,} of {self.total_params:,} parameters train "
                f"({100 * self.share:.2f}%), {len(self.trainable)} tensors trainable, {len(self.frozen)} frozen, "
                f"{len(self.layers)} decomposed layers or merged blocks")

    def table(self) -> str:
        """The summary, then one line per decomposed layer or merged block with the indices of its
        trainable factors (a merged block's factors: its first, inner and last conv)."""
        width = max((len(name) for name in self.layers), default=5)
        lines = [str(self)]
        for name, indices in self.layers.items():
            lines.append(f"  {name:<{width}}  trains factors {list(indices)}")
        return "\n".join(lines)
