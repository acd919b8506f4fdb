"""Measured layer times that persist across runs, so a second search on one machine is free.

A time is only valid for the hardware and software that produced it, so every key names the
device (CPU model and thread count, or GPU name), the torch version, dtype, objective, the layer's
geometry with its input shape and memory format, and the rank. The file is JSON, written
atomically (temp file + rename) and merged with whatever another process wrote meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lrdaccel._files import atomic_write, check_header

CACHE_FORMAT = "lrdaccel.timings"
CACHE_VERSION = 1
CACHE_FILE = "timings.json"

CacheArg = Union[None, bool, str, os.PathLike, "TimingCache"]


@dataclass(frozen=True)
class CachedTime:
    """One measurement: the median time, and the wall time it cost to take (for the search budget)."""

    ms: float
    cost_s: float


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/lrdaccel/timings.json, else ~/.cache/lrdaccel/timings.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lrdaccel" / CACHE_FILE


class TimingCache:
    """Layer times by key, in memory and (unless `path` is None) in a JSON file.

    Args:
        path: the JSON file; None keeps times in memory only (still shared by identical layers).

    Raises:
        ValueError: the file exists but is not an lrdaccel timing cache, is newer than this reads,
            or has a malformed entry (a time or cost that is not a JSON number: "5", true, null).

    Entries whose time is not a positive finite number (zero, negative, NaN, infinite: a broken
    timer or a hand-edited file) would choose ranks by nonsense; they are dropped when the file is
    read, with one warning, so the layers they covered are timed again.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, CachedTime] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._entries, dropped = _read(self.path)
            if dropped:
                warnings.warn(f"timing cache {self.path}: dropped {dropped} entr{'y' if dropped == 1 else 'ies'} "
                              f"whose time is not a positive finite number; they will be timed again",
                              stacklevel=2)

    @classmethod
    def from_arg(cls, cache: CacheArg) -> "TimingCache":
        """None: the default file; False: memory only; a path: that file; a TimingCache: itself."""
        if isinstance(cache, TimingCache):
            return cache
        if cache is None or cache is True:
            return cls(default_cache_path())
        if cache is False:
            return cls(None)
        if isinstance(cache, (str, os.PathLike)):
            return cls(cache)
        raise ValueError(f"cache must be None (default file), False (off), a path or a TimingCache, got {cache!r}")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedTime | None:
        return self._entries.get(key)

    def put(self, key: str, ms: float, cost_s: float) -> None:
        self._entries[key] = CachedTime(float(ms), float(cost_s))
        self._dirty = True

    def save(self) -> None:
        """Merge with the file as it is now and replace it atomically; no-op in memory or when clean."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = _read(self.path)[0] if self.path.exists() else {}
        merged.update(self._entries)
        data = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "entries": {k: {"ms": v.ms, "cost_s": v.cost_s} for k, v in sorted(merged.items())},
        }
        text = json.dumps(data, indent=1) + "\n"
        atomic_write(self.path, lambda path: Path(path).write_text(text))
        self._entries = merged
        self._dirty = False


def _read(path: Path) -> tuple[dict[str, CachedTime], int]:
    """(the file's usable entries, how many were dropped for a time that is not positive and finite)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"timing cache {path}: cannot read it as JSON ({error}); "
                         f"delete it or pass another path") from None
    check_header(data, CACHE_FORMAT, CACHE_VERSION, f"timing cache {path}", "timing cache")
    raw = data.get("entries") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"timing cache {path}: \"entries\" must be an object, got {type(raw).__name__}; "
                         f"delete it or pass another path")
    entries, dropped = {}, 0
    for key, value in raw.items():
        try:
            entry = CachedTime(_number(value["ms"]), _number(value["cost_s"]))
        except (TypeError, KeyError):
            raise ValueError(f"timing cache {path}: entry {key!r} is malformed: {value!r}") from None
        if _usable(entry):
            entries[key] = entry
        else:
            dropped += 1
    return entries, dropped


def _number(value: object) -> float:
    """A JSON number as a float. The cache writes numbers only: a string ("5", "1_000") or a bool
    (true, which float() reads as 1 ms) is an edit or a corruption, not a time.

    Raises:
        TypeError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


def _usable(entry: CachedTime) -> bool:
    """A time a search can trust: positive and finite (its cost finite and not negative)."""
    return math.isfinite(entry.ms) and entry.ms > 0 and math.isfinite(entry.cost_s) and entry.cost_s >= 0
