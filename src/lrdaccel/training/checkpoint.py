"""The training checkpoint (finetune and distill): its file format, the RNG states it carries, and
the checks on resume.

A checkpoint is one `torch.save`d dict (tensors and plain Python only, read back with
`weights_only=True`), written to a temporary file and renamed, by rank 0 only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrdaccel._files import atomic_write, check_header

CHECKPOINT_NAME = "checkpoint.pt"
# The format is "lrdaccel.<verb>": a distillation checkpoint never resumes a fine-tuning run.
CHECKPOINT_VERSION = 1
_WHAT = {"finetune": "fine-tuning checkpoint", "distill": "distillation checkpoint"}


def _format(verb: str) -> str:
    return f"lrdaccel.{verb}"


def write_checkpoint(path: Path, payload: dict[str, Any], verb: str = "finetune") -> None:
    """Write `payload` (model, optimizer, position, ...) with the format header, atomically."""
    checkpoint = {"format": _format(verb), "version": CHECKPOINT_VERSION, **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))


def read_checkpoint(path: Path, verb: str = "finetune") -> dict[str, Any]:
    """The checkpoint at `path`, its format (that of `verb`: "finetune" or "distill") and version
    checked.

    Raises:
        FileNotFoundError: no file there.
        ValueError: not a readable lrdaccel checkpoint of this verb, or a newer version.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable lrdaccel checkpoint ({error})") from None
    check_header(checkpoint, _format(verb), CHECKPOINT_VERSION, str(path), _WHAT[verb])
    return checkpoint


def check_same_run(path: Path, saved: dict, mine: dict) -> None:
    """A resumed run must have the settings that decide the result equal to the saved ones.

    Raises:
        ValueError: naming every setting that differs.
    """
    differs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if differs:
        raise ValueError(f"{path}: the checkpoint is from a run with other settings: " + "; ".join(differs))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
