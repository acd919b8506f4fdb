"""Layer time against rank for one layer (the "staircase", Fig. 2 of arXiv 2407.20266).

Shows whether a device has steps (a rank one above a step costs much more time for almost no
extra capacity) or a smooth curve (time follows rank), which is what the rank search exploits.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from lrdaccel._settings import check_choice, parse_device, parse_dtype
from lrdaccel.factorize.ranks import Rank, tucker_pair
from lrdaccel.layers import entry_for
from lrdaccel.measure.runtimes import check_runtime
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.rankopt.cache import CacheArg, TimingCache
from lrdaccel.rankopt.capture import InputSpec
from lrdaccel.rankopt.layer_times import LayerTimes, dtype_name
from lrdaccel.rankopt.layer_timing import BenchmarkTimer, Timer, input_signature, layer_signature


@dataclass
class Staircase:
    """Measured time of one layer at each rank, with its parameter count and the original's time."""

    label: str
    objective: str
    ranks: list
    times_ms: list[float]
    params: list[int]
    original_ms: float
    original_params: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_staircase(
    layer: nn.Module,
    input_shape: Sequence[int],
    ranks: Iterable[Rank],
    objective: str = "infer",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    memory_format: str = "contiguous",
    cache: CacheArg = None,
    timer: Timer | None = None,
    label: str | None = None,
    runtime: str = "eager",
) -> Staircase:
    """Time `layer` decomposed at each rank, and the original, on an input of `input_shape`.

    Args:
        layer: a dense nn.Linear / HF Conv1D / nn.Conv2d (not changed; a copy is timed).
        input_shape: the full input shape, batch included, e.g. (8, 512, 14, 14).
        ranks: SVD ranks, or for a kxk conv ints (rank_in = rank_out) or (rank_in, rank_out) pairs.
        objective: "infer" or "train".
        device, dtype: where and in what precision (default: the layer's own).
        memory_format: "contiguous" or "channels_last".
        cache: as in `optimize_ranks` (None: default file; False: none; a path).
        timer: `timer(TimingJob) -> ms`; default BenchmarkTimer().
        label: the plot title (default: the layer geometry and input).
        runtime: what to time in: "eager", "compile" or "onnxruntime" (`lrdaccel.measure.runtimes`).

    Returns:
        A Staircase.

    Raises:
        ValueError: an unsupported layer, a bad rank, objective, runtime or memory format.
    """
    entry = entry_for(layer)
    if entry is None or entry.cannot(layer) is not None:
        raise ValueError(f"measure_staircase: cannot decompose {type(layer).__name__} "
                         f"({entry.cannot(layer) if entry else 'unsupported type'})")
    check_choice("objective", objective, OBJECTIVES)
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")
    weight = layer.weight
    device = parse_device(device) if device is not None else weight.device
    check_runtime(runtime, objective, device)
    dtype = parse_dtype(dtype) if dtype is not None else weight.dtype
    spec = InputSpec(tuple(int(d) for d in input_shape), dtype, device, memory_format)
    if entry.kind == "tucker2":
        ranks = [tucker_pair(r, "staircase", layer.in_channels, layer.out_channels) for r in ranks]
    for rank in ranks:
        entry.layer_class.like(layer, rank, "staircase")  # validates the rank against the shape
    times = LayerTimes(layer, entry.kind, spec, objective, device, dtype,
                       TimingCache.from_arg(cache), timer or BenchmarkTimer(), runtime)
    original = times(None).ms
    measured = [times(rank).ms for rank in ranks]
    times.cache.save()
    params = [entry.layer_class.like(times.local, rank).factor_params() for rank in ranks]
    title = label or f"{layer_signature(layer)}, {input_signature(spec)}, {dtype_name(dtype)}, {device}, {runtime}"
    return Staircase(title, objective, ranks, measured, params, original, weight.numel())


def plot_staircase(staircase: Staircase, path: str | os.PathLike) -> Path:
    """Write a PNG of time (and parameters) against rank; returns the path.

    Raises:
        ValueError: an empty staircase.
    """
    if not staircase.ranks:
        raise ValueError("plot_staircase: the staircase has no ranks")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = isinstance(staircase.ranks[0], tuple)
    square = pairs and all(r[0] == r[1] for r in staircase.ranks)
    x = [r[0] if pairs else r for r in staircase.ranks]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, staircase.times_ms, "o-", color="tab:blue", markersize=4, label="decomposed layer time")
    ax.axhline(staircase.original_ms, color="tab:red", linestyle="--", label="original layer time")
    ax.set_xlabel("rank (rank_in = rank_out)" if square else "rank_in" if pairs else "rank")
    ax.set_ylabel(f"{staircase.objective} time per call (ms, median)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, [p / 1e6 for p in staircase.params], color="tab:gray", alpha=0.6, label="parameters")
    twin.set_ylabel("parameters (millions)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(staircase.label, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_staircase(staircase: Staircase, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `staircase.json` (the data) and `staircase.png` (the plot) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "staircase.json"
    data.write_text(json.dumps(staircase.to_dict(), indent=2) + "\n")
    return {"plot": plot_staircase(staircase, out_dir / "staircase.png"), "data": data}
