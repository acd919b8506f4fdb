"""The narrow form on the trained Fashion-MNIST CNN (zoo `fmnist-cnn`), no training after
compression, 1 thread: test accuracy right after compression and eager serving speed, against the
factorized form and torch-pruning at the same parameters.

The CNN is trained here first (AdamW, `starting_models.trained_fmnist_cnn`, cached under
benchmarks/scratch/). Calibration: 1,000 training images (batches of 100; also what BatchNorm
statistics are re-estimated on). Serving: a batch of 256 test images, every model timed interleaved
(lrdaccel.measure.timer), min/median/max of the speed-up over the original per repeat.

Variants: narrow r2 (every narrowable width: the inner width of each residual block keeps half
its channels, `form="narrow"`); lrd r2 whitened (every layer factorized at ratio 2); prune at
each of those parameter counts (torch-pruning, magnitude, `lrdaccel.peers.prune`).

    OMP_NUM_THREADS=1 python benchmarks/narrow_fmnist.py       # ~5 min on one core, after training

Writes benchmarks/results/narrow/fmnist_cnn.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import peers
from lrdaccel.data import standardized_splits
from lrdaccel.measure.counting import count_params
from lrdaccel.measure.timer import Phase, Workload, measure_interleaved, ratio_to_baseline, spread
from starting_models import trained_fmnist_cnn


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                  for i in range(0, len(images), 500))
    return 100.0 * correct / len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/narrow")
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    original = trained_fmnist_cnn("fmnist-cnn", epochs=2, train_limit=args.train_limit, progress=False)
    train, test = standardized_splits("fashion-mnist", train_limit=args.train_limit)
    images, labels = test.tensors
    calibration = [train.tensors[0][i:i + 100] for i in range(0, 1000, 100)]
    example = calibration[0][:1]
    built = {"original": (original, 0.0)}

    def make(name, plan, **settings):
        begin = time.perf_counter()
        model = copy.deepcopy(original)
        lrd.decompose(model, plan, calibration=calibration, **settings)
        built[name] = (model.eval(), time.perf_counter() - begin)

    narrow = lrd.plan(original, ratio=2, form="narrow", example_inputs=example)
    make("narrow r2", narrow)
    make("lrd r2 (whitened)", lrd.plan(original, ratio=2), method="whiten")
    before = count_params(original)
    for name in ("narrow r2", "lrd r2 (whitened)"):
        begin = time.perf_counter()
        pruned, _ = peers.prune(original, example, params_fraction=count_params(built[name][0]) / before)
        built[f"prune at {name}"] = (pruned.eval(), time.perf_counter() - begin)
    rows = {name: {"params": count_params(model), "accuracy": round(accuracy(model, images, labels), 2),
                   "build_s": round(seconds, 1)} for name, (model, seconds) in built.items()}
    serving = images[:256]

    def step(model):
        def serve():
            with torch.no_grad():
                return model(serving)
        return serve

    timings = measure_interleaved([Workload(name, [Phase(step(model))]) for name, (model, _) in built.items()],
                                  repeats=args.repeats, warmup=2, min_run_time=1.0, alternate=True)
    for name in built:
        rows[name]["ms"] = {k: round(v * 1e3, 1) for k, v in spread(timings.seconds[name]).items() if k != "values"}
        rows[name]["speedup"] = {k: round(v, 3) for k, v in ratio_to_baseline(timings, name, "original").items()
                                 if k != "values"}
    report = {"model": "fmnist-cnn", "train_limit": args.train_limit, "threads": 1, "calibration_images": 1000,
              "serving_batch": list(serving.shape), "repeats": args.repeats, "torch": torch.__version__,
              "narrow_plan": str(narrow), "seconds": round(time.perf_counter() - started), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fmnist_cnn.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fmnist_cnn.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    before = report["rows"]["original"]["params"]
    lines = [f"fmnist-cnn trained on {report['train_limit']} Fashion-MNIST images (2 epochs), no training after "
             f"compression, {report['threads']} thread, eager; accuracy on the 10,000 test images; serving batch "
             f"{report['serving_batch']}, {report['repeats']} interleaved repeats.", "",
             "| model | params | test accuracy | median ms | speed-up median (min-max) |", "|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        s = row["speedup"]
        lines.append(f"| {name} | {row['params'] / 1e3:.0f}k ({row['params'] / before:.3f}x) | {row['accuracy']:.2f}% | "
                     f"{row['ms']['median']:.1f} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
