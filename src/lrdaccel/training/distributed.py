"""Data-parallel plumbing: joining the process group torchrun describes, the default device,
sums across processes, and DistributedDataParallel re-wrapped when the trainable set changes.

Why re-wrap. DDP builds its reducer (the gradient buckets and the autograd hooks that
all-reduce them) from the parameters that require grad when it wraps the model; a parameter
frozen later leaves its bucket waiting forever, and one thawed later is never synchronised.
`PhaseDDP.wrap(model, key)` returns a DDP wrapper built for the current trainable set, the same
object until the key (the freezer's switch count) changes, then a new one (the old one's hooks
are removed). We chose this over the alternatives because in steady state it is plain DDP:
`find_unused_parameters=True` would traverse the autograd graph every step and still all-reduce
the frozen factors' (absent) gradients' buckets, and `static_graph=True` records the unused set
once and is wrong after the first switch. A re-wrap costs one broadcast of the parameters and
buffers from rank 0 and a bucket rebuild, once per phase; every rank switches at the same step,
so the collective lines up.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> bool:
    """Join the process group torchrun describes, if any. Returns True if this call created it."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Inside: joined to the process group torchrun describes (if any); left on exit if this
    call joined it. Nested uses share the outermost one's group."""
    created = init_distributed()
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def default_device() -> torch.device:
    """This process's CUDA device if there is one (LOCAL_RANK under torchrun), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over every process (itself when not distributed)."""
    if rank_and_world()[1] == 1:
        return values
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class PhaseDDP:
    """One DistributedDataParallel wrapper per trainable set (see the module docstring)."""

    def __init__(self):
        self.wrapper: nn.parallel.DistributedDataParallel | None = None
        self._key = None

    def wrap(self, model: nn.Module, key, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
        """The wrapper for `key` (e.g. the freezer's switch count): reused while it holds."""
        full_key = (id(model), key, tuple(sorted(ddp_kwargs.items(), key=lambda kv: kv[0])))
        if self.wrapper is not None and self._key == full_key:
            return self.wrapper
        self.release()
        self.wrapper = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        self._key = full_key
        return self.wrapper

    def release(self) -> None:
        """Drop the current wrapper and its autograd hooks."""
        if self.wrapper is not None and hasattr(self.wrapper, "_remove_autograd_hooks"):
            # A wrapper the caller still holds must not react to later backward passes.
            self.wrapper._remove_autograd_hooks()
        self.wrapper, self._key = None, None
