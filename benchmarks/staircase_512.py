"""Time vs rank of a [512,512,3,3] conv under Tucker-2 at 14x14, batch 8, ranks 240..272 (Fig. 2 of
arXiv 2407.20266, on this machine).

    .venv/bin/python benchmarks/staircase_512.py [--threads 1] [--out benchmarks/results/staircase_512]
"""

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from lrdaccel.rankopt.staircase import measure_staircase, plot_staircase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/staircase_512"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    staircase = measure_staircase(conv, (8, 512, 14, 14), range(240, 273), cache=False)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_staircase(staircase, args.out / "staircase.png")
    (args.out / "staircase.json").write_text(json.dumps(staircase.to_dict(), indent=2) + "\n")
    for rank, ms in zip(staircase.ranks, staircase.times_ms):
        print(f"rank {rank}: {ms:.2f} ms")
    print(f"original: {staircase.original_ms:.2f} ms")


if __name__ == "__main__":
    main()
