"""Training-step throughput of HF ResNet-50 decomposed at ratio 2, per freezing schedule.

    .venv/bin/python benchmarks/freezing_resnet50.py [--batch 8] [--size 224] [--repeats 5]

The model is transformers' ResNetForImageClassification(ResNetConfig(num_labels=1000)) (the
ImageNet head of the papers), random weights: speed does not depend on the values, so the Tucker-2
factors come from HOSVD alone (n_iter=0) to save minutes. A training step is zero_grad, forward,
cross-entropy, backward and an SGD-with-momentum step, on one fixed batch.

Rows: the dense model, then the decomposed model with no freezing, rotate, freeze_one and static.
A schedule's time in a repeat is the mean over one cycle of its phases (6 for rotate and
freeze_one: SVD layers have 2 factors, Tucker-2 layers 3). Within every repeat all rows and phases
are timed in turn (interleaved), so machine drift hits them alike; the throughput ratio to "none"
is taken within each repeat and reported as min/median/max over repeats. FLOPs per step come from
torch.utils.flop_counter (a frozen factor's weight gradient is not computed). Timing is
torch.utils.benchmark's Timer with all of torch's threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode
from transformers import ResNetConfig, ResNetForImageClassification

import lrdaccel as lrd

SCHEDULES = ("rotate", "freeze_one", "static")
RESULTS = Path(__file__).with_name("results")


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_labels=1000)).train()


def make_step(model, batch: int, size: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, 1000, (batch,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).logits, y).backward()
        optimizer.step()

    return step


def phases_of(model, schedule: str | None) -> list:
    """(label, prepare) per phase; prepare puts the model in that phase's trainable set."""
    if schedule is None:
        return [("all", lambda: model.requires_grad_(True))]

    def prepare(phase):
        def apply():
            model.requires_grad_(True)  # a fresh freezer must see every factor as its to manage
            freezer = lrd.SequentialFreezer(model, schedule=schedule)
            freezer.set_epoch(phase)
            return freezer

        return apply

    cycle = lrd.SequentialFreezer(model, schedule=schedule).cycle
    model.requires_grad_(True)
    return [(f"phase {p}", prepare(p)) for p in range(cycle)]


def share(model) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def measure(step) -> float:
    return Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()).timeit(1).mean


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads per process "
                             "spin against other processes and run several times slower)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = build_model()
    decomposed = build_model()
    start = time.perf_counter()
    report = lrd.decompose(decomposed, ratio=2.0, n_iter=0)
    decompose_seconds = time.perf_counter() - start
    print(f"decomposed {len(report.layers)} layers in {decompose_seconds:.0f} s; parameters "
          f"{report.model_params_before:,} -> {report.model_params_after:,}")

    rows = {"dense": (dense, [("all", lambda: None)]), "none": (decomposed, phases_of(decomposed, None))}
    rows.update({s: (decomposed, phases_of(decomposed, s)) for s in SCHEDULES})
    steps = {"dense": make_step(dense, args.batch, args.size), "decomposed": make_step(decomposed, args.batch, args.size)}

    def step_of(name):
        return steps["dense" if name == "dense" else "decomposed"]

    flops, shares = {}, {}
    for name, (model, phases) in rows.items():  # FLOPs and trainable share; the counted step is the warm-up
        flops[name], shares[name] = [], []
        for label, prepare in phases:
            prepare()
            with FlopCounterMode(display=False) as counter:
                step_of(name)()
            flops[name].append(counter.get_total_flops())
            shares[name].append(share(model))
        print(f"{name}: {statistics.fmean(flops[name]) / 1e9:.1f} GFLOP per step (mean over {len(phases)} phases)")

    seconds = {name: [] for name in rows}
    per_phase = {name: [] for name in rows}
    for repeat in range(args.repeats):
        for name, (model, phases) in rows.items():
            times = []
            for label, prepare in phases:
                prepare()
                times.append(measure(step_of(name)))
            per_phase[name].append(times)
            seconds[name].append(statistics.fmean(times))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()))

    results = {
        "benchmark": "freezing_resnet50",
        "model": "transformers ResNetForImageClassification(ResNetConfig(num_labels=1000)), random weights",
        "decomposition": {"ratio": 2.0, "layers": len(report.layers), "params_before": report.model_params_before,
                          "params_after": report.model_params_after, "tucker_hooi_iters": 0},
        "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
                    platform.machine(), "python": platform.python_version()},
        "rows": {},
    }
    for name in rows:
        ratios = [base / own for base, own in zip(seconds["none"], seconds[name])]
        results["rows"][name] = {
            "phases": len(rows[name][1]),
            "trainable_share": statistics.fmean(shares[name]),
            "gflop_per_step": statistics.fmean(flops[name]) / 1e9,
            "flop_ratio_to_none": statistics.fmean(flops["none"]) / statistics.fmean(flops[name]),
            "seconds_per_step": spread(seconds[name]),
            "throughput_ratio_to_none": spread(ratios),
            "seconds_per_phase": per_phase[name],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freezing_resnet50.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "freezing_resnet50.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        f"# Sequential freezing: ResNet-50 training-step throughput (CPU, {results['machine']['threads']} threads)",
        "",
        f"HF ResNet-50 (1000 classes), decomposed at ratio 2 ({results['decomposition']['layers']} layers, "
        f"{results['decomposition']['params_before']:,} -> {results['decomposition']['params_after']:,} parameters); "
        f"batch {results['batch']} at {results['size']}x{results['size']}, SGD with momentum; "
        f"{results['repeats']} interleaved repeats; torch {results['machine']['torch']}.",
        "Throughput ratio = time per step of `none` / time per step of the row, per repeat; a schedule's "
        "time is the mean over its cycle of phases. FLOPs from torch.utils.flop_counter.",
        "",
        "| row | phases | trainable share | GFLOP/step | FLOP ratio | s/step (median) | throughput vs none min / median / max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        r = row["throughput_ratio_to_none"]
        lines.append(f"| {name} | {row['phases']} | {100 * row['trainable_share']:.1f}% | {row['gflop_per_step']:.1f} | "
                     f"{row['flop_ratio_to_none']:.3f} | {row['seconds_per_step']['median']:.2f} | "
                     f"{r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
