"""The optional `peers` extra (torch-pruning, PEFT): imported lazily, checked before any work.

lrdaccel itself needs neither package; only the peer baselines do. Each entry point calls
`require_peers(kind)` first, so a missing package is one clear line before any copying, tracing or
timing, and a benchmark can call it up front for every peer it will run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# kind -> (module imported, package name on PyPI)
PACKAGES = {"prune": ("torch_pruning", "torch-pruning"), "lora": ("peft", "peft")}


def require_peers(kind: str) -> ModuleType:
    """The package a peer needs ("prune": torch_pruning, "lora": peft), imported.

    Raises:
        ValueError: an unknown kind.
        ImportError: the package is missing: "... needs the peers extra: pip install lrdaccel[peers]".
    """
    if kind not in PACKAGES:
        raise ValueError(f"peer kind must be one of {tuple(PACKAGES)}, got {kind!r}")
    module, package = PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"lrdaccel.peers.{kind} needs the peers extra ({package} is not installed): "
                          f"pip install lrdaccel[peers]") from None
