"""Each variant's own random stream, so that its training does not depend on its neighbours.

Dropout (and any other random op of a forward or an optimizer step) draws from torch's global
generator. In a race the variants step in turn, so with one shared stream each variant's draws
depend on how many the others made before it: adding a variant changed the original's curve.
A `RandomStream` holds a generator state seeded from (seed, variant name) alone; the race makes it
the global state for the variant's step and keeps what the step left for its next one, then puts
the previous global state back (torch.random.fork_rng does the same for one block, without
keeping the state for the next).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the race's seed and the variant's name (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class RandomStream:
    """The CPU (and, on CUDA, the device's) generator state of one variant."""

    def __init__(self, seed: int, name: str, device: torch.device):
        self.device = device if device.type == "cuda" else None
        number = stream_seed(seed, name)
        self.cpu = torch.Generator().manual_seed(number).get_state()
        self.cuda = None
        if self.device is not None:
            saved = torch.cuda.get_rng_state(self.device)
            torch.cuda.manual_seed(number)
            self.cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(saved, self.device)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, torch's global generator(s) continue this stream; after it, they are
        what they were before."""
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if self.device is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(saved_cuda, self.device)
