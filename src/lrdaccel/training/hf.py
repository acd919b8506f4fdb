"""Sequential freezing inside a Hugging Face `Trainer`.

    from lrdaccel.training.hf import SequentialFreezingCallback
    trainer = Trainer(model=decomposed, args=args, train_dataset=train,
                      callbacks=[SequentialFreezingCallback(schedule="rotate", every_steps=500)])

The callback builds its `SequentialFreezer` at `on_train_begin`, after the Trainer has built its
optimizer: the Trainer hands the optimizer only the parameters that require grad at that moment,
so freezing earlier would leave the factors of later phases out of it for good. From then on the
phase follows the Trainer's own position (`state.epoch`, `state.global_step`), switching at
`on_epoch_begin` or `on_step_end`, after the optimizer step and `zero_grad`; a run resumed from a
Trainer checkpoint therefore lands in the right phase with no state of its own to save.

Under DDP the Trainer owns the wrapper, so it cannot be re-wrapped at a switch: the Trainer's
default for Hugging Face models, `ddp_find_unused_parameters=True`, keeps gradients synchronised
(at the cost of a graph traversal per step); the callback refuses `False`. For the overhead-free
path use `lrd.finetune`, which re-wraps at each switch.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from lrdaccel.training.freezer import SequentialFreezer


class SequentialFreezingCallback(TrainerCallback):
    """Drive a SequentialFreezer from the Trainer's epochs or optimizer steps.

    Args:
        schedule, every_epochs, every_steps, freeze_undecomposed: as for `SequentialFreezer`.

    Attributes:
        freezer: the SequentialFreezer, once training has begun (None before).
    """

    def __init__(self, schedule="rotate", every_epochs: int = 1, every_steps: int | None = None,
                 freeze_undecomposed: bool = False):
        self.settings = dict(schedule=schedule, every_epochs=every_epochs, every_steps=every_steps,
                             freeze_undecomposed=freeze_undecomposed)
        self.freezer: SequentialFreezer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.world_size > 1 and args.ddp_find_unused_parameters is False:
            raise ValueError("SequentialFreezingCallback under DDP needs ddp_find_unused_parameters=True "
                             "(the Trainer's wrapper cannot be rebuilt at each phase switch); got False")
        self.freezer = SequentialFreezer(model, **self.settings)
        if optimizer is not None:
            self.freezer.check_optimizer(optimizer)
        self.freezer.set_step(state.global_step)
        self.freezer.set_epoch(_epoch(state))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.freezer.set_epoch(_epoch(state))

    def on_step_end(self, args, state, control, **kwargs):
        self.freezer.set_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.restore()


def _epoch(state) -> int:
    """The epoch in progress; the Trainer keeps it as a float (1.5 is half-way through the second)."""
    return int(math.floor((state.epoch or 0) + 1e-9))
