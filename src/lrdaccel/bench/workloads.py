"""Training steps under sequential freezing, one timed phase per phase of the schedule.

The plain steps (one inference forward, one training step) are `lrdaccel.measure.steps`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lrdaccel._settings import check_choice
from lrdaccel.measure.steps import Placement, make_train_step, training_phase
from lrdaccel.measure.timer import Phase
from lrdaccel.training.freezer import SCHEDULES, SequentialFreezer


def training_phases(model: nn.Module, inputs: Any, placement: Placement = Placement(),
                    schedule: str | None = None) -> list[Phase]:
    """Training steps of `model`: one phase, or one per phase of a SequentialFreezer schedule."""
    if schedule is None:
        return [training_phase(model, inputs, placement)]
    step = make_train_step(model, inputs, placement)
    freezer = make_freezer(model, schedule)

    def enter(phase: int) -> Callable[[], None]:
        def prepare() -> None:
            model.train()
            freezer.set_epoch(phase)
        return prepare

    # One full cycle of the schedule (rotate over SVD and Tucker-2 layers: 6 phases), so every
    # factor of every layer is counted in proportion to the time it trains.
    return [Phase(step=step, prepare=enter(p), label=f"{schedule} phase {p}") for p in range(freezer.cycle)]


def make_freezer(model: nn.Module, schedule: str) -> SequentialFreezer:
    """A SequentialFreezer that changes phase every epoch (the bench calls set_epoch per phase)."""
    check_choice("freezing schedule", schedule, SCHEDULES)
    return SequentialFreezer(model, schedule=schedule, every_epochs=1)
