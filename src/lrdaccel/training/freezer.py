"""Sequential freezing: only some factors of each decomposed layer train at a time.

A frozen factor needs no weight gradient, so each training step is cheaper, and because the
trainable set changes from one phase to the next (an epoch, or N optimizer steps) every factor
is still trained over the run (arXiv 2309.03824). The static scheme of arXiv 2407.20266, where
only the SVD second factor and the Tucker-2 core ever train, is one of the schedules.

    freezer = lrd.SequentialFreezer(model)                    # rotate, switching every epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # ALL parameters, frozen ones too
    for epoch in range(epochs):
        freezer.set_epoch(epoch)
        for x, y in loader:
            ...; optimizer.step()
            freezer.step()                                    # counts steps; switches with every_steps=N

A merged bottleneck (lrdaccel.decomposition.merge_build) counts as one layer whose factors are its three convs
(first 1x1, inner k x k, last 1x1): `rotate` trains one of them per phase, `static` the inner one;
the BatchNorms between them are ordinary layers (see `freeze_undecomposed`).

The core is small, after Lightning's `BaseFinetuning`: static `freeze` / `make_trainable`
helpers, and one overridable method, `trainable_factors(phase, module)`, that decides which
factors train in a phase. A bias lives on its factor's module, so it goes with its factor.

Why the optimizer stays honest. At every switch a newly frozen parameter gets
`requires_grad=False` and `.grad = None`. torch's SGD, Adam and AdamW (for-loop, foreach and
fused) only touch parameters whose `.grad` is not None: no momentum, no Adam moment and no
(decoupled) weight decay reaches a frozen factor, whatever `zero_grad(set_to_none=...)` does,
since a None grad stays None and backward never fills it. Build the optimizer over all the
parameters: one built from the parameters trainable at that moment would never update the
factors that train in later phases (`check_optimizer` catches that).

Distributed data parallel: re-wrap at each switch. `wrap_ddp(model, **ddp_kwargs)` returns a
DistributedDataParallel built for the current trainable set, a new one after each switch (see
lrdaccel.training.distributed for why). Call it before each forward (or once per phase) and use
what it returns.

torch.compile: no special handling is needed. With parameters traced as graph inputs (the
default since torch 2.5), dynamo guards on each parameter's `requires_grad`, so the first step
after a switch recompiles for the new trainable set, and the compiled graph computes the same
gradients as eager mode (checked against eager, on torch 2.13, in tests/test_freezing_compile.py).
Each distinct trainable set is one cached graph: rotate over SVD and Tucker-2 layers makes at most
three, under dynamo's default recompile limit of 8.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

from lrdaccel._modules import clean_name, unwrap
from lrdaccel._settings import check_int
from lrdaccel.decomposition.merged_blocks import merged_blocks
from lrdaccel.layers import LowRankModule
from lrdaccel.layers.merged import MergedBlock
from lrdaccel.training.distributed import PhaseDDP
from lrdaccel.training.phase_report import PhaseReport

SCHEDULES = ("rotate", "freeze_one", "static")
# Index of the factor that trains under the static scheme: the SVD second factor (rank -> out),
# the (branched) Tucker-2 core and a merged block's inner conv are all factors[1].
STATIC_FACTOR = {"svd": 1, "tucker2": 1, "tucker2_branched": 1, "merged": 1}
STATE_VERSION = 1

# A decomposed layer or a merged block: what has `factors` the freezer rotates over.
Unit = Union[LowRankModule, MergedBlock]
# A schedule name, or (phase, decomposed layer or merged block) -> indices of its factors that train.
Schedule = Union[str, Callable[[int, Unit], Iterable[int]]]


class SequentialFreezer:
    """Rotate which factors of each decomposed layer train, phase by phase.

    Args:
        model: a model decomposed (or merged) by `lrd.decompose` (or wrapped in DDP / torch.compile).
        schedule: "rotate" (phase p trains factor p mod n of each layer with n factors),
            "freeze_one" (phase p freezes only factor p mod n), "static" (only the SVD second
            factor and the Tucker-2 core train, always), or a callable
            `(phase, module) -> indices of the factors that train`.
        every_epochs: epochs per phase, counted by `set_epoch`.
        every_steps: optimizer steps per phase, counted by `step()`; when given, epochs do not
            switch phases.
        freeze_undecomposed: freeze every parameter outside the decomposed layers for the whole
            run (default: leave them as they are).

    The freezer only thaws what it froze itself: parameters the user freezes, before or after
    creating it, stay frozen through every switch and `restore()`. The constructor applies phase 0.

    Raises:
        ValueError: no decomposed layer in the model, an unknown schedule, or a bad period.
    """

    def __init__(self, model: nn.Module, schedule: Schedule = "rotate", every_epochs: int = 1,
                 every_steps: int | None = None, freeze_undecomposed: bool = False):
        if not (callable(schedule) or schedule in SCHEDULES):
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable (phase, module) -> "
                             f"factor indices, got {schedule!r}")
        check_int("every_epochs", every_epochs, 1)
        check_int("every_steps", every_steps, 1, optional=True)
        self.model = model
        self.schedule = schedule
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.freeze_undecomposed = freeze_undecomposed
        module = unwrap(model)
        self._module = module
        self._names = {id(p): name for name, p in module.named_parameters()}
        self._frozen_here: set[int] = set()  # ids of the parameters this freezer froze (and may thaw)
        order = {name: i for i, (name, _) in enumerate(module.named_modules())}
        units: dict[str, Unit] = {name: m for name, m in module.named_modules() if isinstance(m, LowRankModule)}
        units.update(merged_blocks(module))
        self.layers: dict[str, Unit] = dict(sorted(units.items(), key=lambda item: order[item[0]]))
        if not self.layers:
            raise ValueError(f"{type(module).__name__} has no decomposed layers (LowRankModule) or merged blocks; "
                             f"run lrd.decompose(model, ...) before SequentialFreezer")
        # Per layer, per factor: the parameters the freezer manages (those trainable at the start).
        self._factor_params = {
            name: [[p for p in factor.parameters() if p.requires_grad] for factor in layer.factors]
            for name, layer in self.layers.items()
        }
        managed = {id(p) for groups in self._factor_params.values() for params in groups for p in params}
        inside = {id(p) for layer in self.layers.values() for p in layer.parameters()}
        self._undecomposed = [p for p in module.parameters() if id(p) not in inside and p.requires_grad]
        self._managed_names = sorted(self._names[i] for i in managed)
        self.epoch = 0
        self.global_step = 0
        self.phase = 0
        self.switches = 0  # how many times the trainable set was (re)applied; keys the DDP wrapper
        self._ddp = PhaseDDP()
        self._apply(0)  # checks the schedule on every layer before changing anything
        if freeze_undecomposed:
            self._set(self._undecomposed, train=False)

    # ---- the overridable decision -------------------------------------------------------------

    def trainable_factors(self, phase: int, module: Unit) -> Sequence[int]:
        """Indices into `module.factors` of the factors that train in `phase`. Override to customise."""
        n = len(module.factors)
        if callable(self.schedule):
            return self.schedule(phase, module)
        if self.schedule == "rotate":
            return [phase % n]
        if self.schedule == "freeze_one":
            return [i for i in range(n) if i != phase % n]
        if module.kind not in STATIC_FACTOR:
            raise ValueError(f"static schedule: no rule for decomposed layer kind {module.kind!r} "
                             f"({type(module).__name__}); known kinds: {sorted(STATIC_FACTOR)}")
        return [STATIC_FACTOR[module.kind]]

    # ---- static helpers ------------------------------------------------------------------------

    @staticmethod
    def freeze(params: Iterable[nn.Parameter]) -> None:
        """No gradient from now on, and none left over for the optimizer to apply."""
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    @staticmethod
    def make_trainable(params: Iterable[nn.Parameter]) -> None:
        for p in params:
            p.requires_grad_(True)

    # ---- position ------------------------------------------------------------------------------

    def phase_at(self, epoch: int, global_step: int) -> int:
        """The phase for a training position."""
        if self.every_steps is not None:
            return global_step // self.every_steps
        return epoch // self.every_epochs

    def set_epoch(self, epoch: int) -> bool:
        """Call at the start of each epoch. Returns True if the trainable set changed.

        Raises:
            ValueError: `epoch` is not an int >= 0.
        """
        check_int("set_epoch: epoch", epoch, 0)
        self.epoch = epoch
        return self._move_to(self.phase_at(self.epoch, self.global_step))

    def step(self) -> bool:
        """Call after each optimizer step. Returns True if the trainable set changed."""
        self.global_step += 1
        return self._move_to(self.phase_at(self.epoch, self.global_step))

    def set_step(self, global_step: int) -> bool:
        """Jump to an optimizer-step count (for loops that keep their own, like HF's Trainer).

        Raises:
            ValueError: `global_step` is not an int >= 0.
        """
        check_int("set_step: global_step", global_step, 0)
        self.global_step = global_step
        return self._move_to(self.phase_at(self.epoch, self.global_step))

    @property
    def cycle(self) -> int | None:
        """Phases after which the built-in schedule repeats (None for a callable)."""
        if callable(self.schedule):
            return None
        if self.schedule == "static":
            return 1
        return math.lcm(*(len(layer.factors) for layer in self.layers.values()))

    def _move_to(self, phase: int) -> bool:
        if phase == self.phase:
            return False
        return self._apply(phase)

    def _apply(self, phase: int) -> bool:
        before = self._trainable_ids()
        chosen = {name: self._checked(name, layer, phase) for name, layer in self.layers.items()}
        for name, indices in chosen.items():
            for i, params in enumerate(self._factor_params[name]):
                self._set(params, train=i in indices)
        self.phase = phase
        self._chosen = chosen
        changed = self._trainable_ids() != before
        if changed:
            self.switches += 1
        return changed

    def _set(self, params: Iterable[nn.Parameter], train: bool) -> None:
        """Thaw (only what this freezer froze) or freeze (what trains now), keeping track."""
        for p in params:
            if train:
                if id(p) in self._frozen_here:
                    self.make_trainable([p])
                    self._frozen_here.discard(id(p))
            elif p.requires_grad:
                self.freeze([p])
                self._frozen_here.add(id(p))

    def _checked(self, name: str, layer: Unit, phase: int) -> tuple[int, ...]:
        indices = self.trainable_factors(phase, layer)
        n = len(layer.factors)
        try:
            result = tuple(sorted(set(indices)))
        except TypeError:
            result = None
        if result is None or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in result):
            raise ValueError(f"layer {name!r}: the schedule must give factor indices in [0, {n}) for phase "
                             f"{phase}, got {indices!r}")
        return result

    def _trainable_ids(self) -> frozenset[int]:
        return frozenset(id(p) for p in self._module.parameters() if p.requires_grad)

    # ---- reporting -----------------------------------------------------------------------------

    def report(self) -> PhaseReport:
        """What trains now: per decomposed layer the factor indices, and every parameter by name."""
        trainable, frozen, n_trainable, n_total = [], [], 0, 0
        for name, p in self._module.named_parameters():
            n_total += p.numel()
            if p.requires_grad:
                trainable.append(name)
                n_trainable += p.numel()
            else:
                frozen.append(name)
        return PhaseReport(self.phase, dict(self._chosen), tuple(trainable), tuple(frozen), n_trainable, n_total)

    def print_trainable_parameters(self) -> None:
        print(self.report())

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Every factor the schedule trains must be in the optimizer, or it would never move.

        Raises:
            ValueError: naming the parameters missing from every param group.
        """
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        managed = [p for groups in self._factor_params.values() for params in groups for p in params]
        missing = [self._names[id(p)] for p in managed if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"the optimizer lacks {len(missing)} factor parameters the freezer will train, e.g. "
                f"{missing[:3]}; build it over model.parameters(), not only the parameters trainable now"
            )

    # ---- DDP -----------------------------------------------------------------------------------

    def wrap_ddp(self, model: nn.Module | None = None, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
        """The model in a DistributedDataParallel built for the current trainable set.

        Returns the same wrapper while the set is unchanged, and a new one after a switch (see
        lrdaccel.training.distributed for why). Every rank must call it at the same points.

        Args:
            model: what to wrap (default: the model given to the freezer).
            **ddp_kwargs: passed to DistributedDataParallel (device_ids, bucket_cap_mb, ...).
        """
        return self._ddp.wrap(self.model if model is None else model, self.switches, **ddp_kwargs)

    def release_ddp(self) -> None:
        """Drop the current DDP wrapper and its autograd hooks."""
        self._ddp.release()

    def restore(self) -> None:
        """Undo the freezer: thaw every parameter it froze; what the user froze stays frozen."""
        self.release_ddp()
        for p in self._module.parameters():
            if id(p) in self._frozen_here:
                p.requires_grad_(True)
        self._frozen_here.clear()

    # ---- resume --------------------------------------------------------------------------------

    def _schedule_name(self) -> str:
        return "callable" if callable(self.schedule) else self.schedule

    def state_dict(self) -> dict:
        """Position, settings and the trainable factor parameters by name (wrapper prefixes stripped)."""
        trainable = {id(p) for p in self._module.parameters() if p.requires_grad}
        return {
            "version": STATE_VERSION,
            "schedule": self._schedule_name(),
            "every_epochs": self.every_epochs,
            "every_steps": self.every_steps,
            "freeze_undecomposed": self.freeze_undecomposed,
            "phase": self.phase,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "trainable": sorted(n for n in self._managed_names if id(self._param(n)) in trainable),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore position and trainable set from `state_dict()` output (of a wrapped model too).

        Raises:
            ValueError: a state from a newer version, other settings, or names this model lacks.
        """
        if not isinstance(state, dict) or not isinstance(state.get("version"), int):
            raise ValueError(f"not a SequentialFreezer state: {type(state).__name__} without 'version'")
        if state["version"] > STATE_VERSION:
            raise ValueError(f"freezer state version {state['version']} is newer than this lrdaccel reads "
                             f"({STATE_VERSION}); upgrade lrdaccel")
        mine = {"schedule": self._schedule_name(), "every_epochs": self.every_epochs,
                "every_steps": self.every_steps, "freeze_undecomposed": self.freeze_undecomposed}
        differs = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in mine.items() if state.get(k) != v]
        if differs:
            raise ValueError("freezer state was saved with other settings: " + "; ".join(differs))
        names = [clean_name(n) for n in state.get("trainable", [])]
        unknown = sorted(set(names) - set(self._managed_names))
        if unknown:
            raise ValueError(f"freezer state names {len(unknown)} factor parameters this model lacks, e.g. "
                             f"{unknown[:3]}; the checkpoint is for another model or decomposition")
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self._apply(int(state["phase"]))
        saved = set(names)
        if saved != {n for n in self._managed_names if self._param(n).requires_grad}:
            warnings.warn(f"the schedule gives another trainable set for phase {self.phase} than the saved one; "
                          f"using the saved set until the next switch", stacklevel=2)
            for n in self._managed_names:
                self._set([self._param(n)], train=n in saved)
            self.switches += 1

    def _param(self, name: str) -> nn.Parameter:
        return self._module.get_parameter(name)
