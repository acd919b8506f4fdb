"""The time-vs-rank staircase of a [512,512,3,3] conv under Tucker-2 (Paper B, Fig. 2), for the bench.

Measuring and plotting are `lrdaccel.rankopt`'s (`measure_staircase`, `plot_staircase`); this
module picks the layer, the input (ResNet-50's last stage: 512 channels at 7x7) and the ranks
(Paper B's 242..270), and writes staircase.png and staircase.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lrdaccel.bench.workloads import Runtime
from lrdaccel.rankopt import measure_staircase, plot_staircase

STAIRCASE_RANKS = range(242, 271)
CHANNELS, SIDE = 512, 7


def write_staircase(out_dir: str | Path, runtime: Runtime, batch_size: int, objective: str = "infer",
                    cache=None, ranks=STAIRCASE_RANKS) -> dict[str, Path]:
    """Time the conv at each rank and the original; write the plot and the data into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
    staircase = measure_staircase(
        conv, (batch_size, CHANNELS, SIDE, SIDE), list(ranks), objective, device=runtime.device,
        dtype="bfloat16" if runtime.autocast_bf16 else None,
        memory_format="channels_last" if runtime.channels_last else "contiguous", cache=cache)
    data = out_dir / "staircase.json"
    data.write_text(json.dumps(staircase.to_dict(), indent=2) + "\n")
    return {"plot": plot_staircase(staircase, out_dir / "staircase.png"), "data": data}
