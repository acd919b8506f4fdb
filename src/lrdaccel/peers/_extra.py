"""The optional `peers` extra (torch-pruning, PEFT): imported lazily, checked before any work.

lrdaccel itself needs neither package; only the peer baselines do. Each entry point calls
`require_peers(kind)` first, so a missing package is one clear line before any copying, tracing or
timing, and a benchmark can call it up front for every peer it will run. Which packages the extra
holds and how to install it is `lrdaccel._extras`' registry, as for every other extra; a kind
needs only its own package (pruning runs without PEFT).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lrdaccel._extras import MissingDependency, import_problem, install_hint, package_name

MODULES = {"prune": "torch_pruning", "lora": "peft"}  # kind -> the module of the peers extra it imports


def require_peers(kind: str, what: str | None = None) -> ModuleType:
    """The package a peer needs ("prune": torch_pruning, "lora": peft), imported.

    Args:
        kind: "prune" or "lora".
        what: who needs it, for the message (default "lrdaccel.peers.<kind>"; the CLI names its
            option, e.g. "--peers prune").

    Raises:
        ValueError: an unknown kind.
        MissingDependency (an ImportError, and a ValueError so the CLI reports it in one line):
            the package is missing or broken: "... needs the peers extra (torch-pruning is not
            installed): pip install lrdaccel[peers]".
    """
    if kind not in MODULES:
        raise ValueError(f"peer kind must be one of {tuple(MODULES)}, got {kind!r}")
    module = MODULES[kind]
    problem = import_problem(module)
    if problem is not None:
        raise MissingDependency(f"{what or f'lrdaccel.peers.{kind}'} needs the peers extra "
                                f"({package_name(module)} {problem}): {install_hint(module)}")
    return importlib.import_module(module)
