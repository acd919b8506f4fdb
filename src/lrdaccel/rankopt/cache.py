"""Measured layer times that persist across runs, so a second search on one machine is free.

A time is only valid for the hardware and software that produced it, so every key names the
device (CPU model and thread count, or GPU name), the torch version, dtype, objective, the layer's
geometry with its input shape and memory format, and the rank. The file is JSON, written
atomically (temp file + rename) and merged with whatever another process wrote meanwhile.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

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


def device_name(device: torch.device | str) -> str:
    """A name for the hardware a time was measured on: GPU name, or CPU model and thread count.

    CPU times depend on how many threads torch uses, so that is part of the name.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{_cpu_model()} x{torch.get_num_threads()} threads"
    return device.type


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class TimingCache:
    """Layer times by key, in memory and (unless `path` is None) in a JSON file.

    Args:
        path: the JSON file; None keeps times in memory only (still shared by identical layers).

    Raises:
        ValueError: the file exists but is not an lrdaccel timing cache, or is newer than this reads.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, CachedTime] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._entries = _read(self.path)

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
        merged = _read(self.path) if self.path.exists() else {}
        merged.update(self._entries)
        data = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "entries": {k: {"ms": v.ms, "cost_s": v.cost_s} for k, v in sorted(merged.items())},
        }
        fd, tmp = tempfile.mkstemp(prefix=".timings-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
                handle.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._entries = merged
        self._dirty = False


def _read(path: Path) -> dict[str, CachedTime]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"timing cache {path}: cannot read it as JSON ({error}); "
                         f"delete it or pass another path") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"timing cache {path}: not an lrdaccel timing cache (missing format={CACHE_FORMAT!r})")
    version = data.get("version")
    if not isinstance(version, int) or version > CACHE_VERSION:
        raise ValueError(f"timing cache {path}: version {version!r} is newer than this lrdaccel reads "
                         f"({CACHE_VERSION}); upgrade lrdaccel")
    entries = {}
    for key, value in (data.get("entries") or {}).items():
        try:
            entries[key] = CachedTime(float(value["ms"]), float(value["cost_s"]))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"timing cache {path}: entry {key!r} is malformed: {value!r}") from None
    return entries
