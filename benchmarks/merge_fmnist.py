"""Layer merging vs plain LRD on real data: a bottleneck ResNet-style CNN on Fashion-MNIST (60k/10k).

Trains the original here (or reuses --cache), then at ratio 2 (the layer reading the image kept):
- "plain LRD": every other conv decomposed on its own (1x1 -> SVD, 3x3 -> Tucker-2, five convs per
  bottleneck), `lrd.decompose(model, lrd.plan(model, ratio=2))`;
- "merged": each bottleneck merged to three convs at its 3x3's ratio-2 Tucker ranks, the other
  layers decomposed as in plain LRD, `lrd.plan(model, ratio=2, merge=True, example_inputs=...)`
  then `lrd.decompose(model, plan, calibration=batches)` (--calibration images of the training set);
- "merged, random init": the same merged shapes, default-initialised, BatchNorms re-estimated on the
  same batches (the baseline the merge's initialisation must beat).
Reported right after: test accuracy and the logits' relative error against the original on the
test set. Then each of plain LRD and merged is fine-tuned for one epoch with `lrd.finetune` (AdamW,
cosine over the epoch) with no freezing, `rotate` and `static` freezing (phases switch every
1/12 epoch), each with and without distillation from the original: accuracy after 1/3 epoch and
after 1 epoch (stopping at 1/3 and resuming from the checkpoint, which is exact), and training
wall time per epoch (evaluation excluded).

    .venv/bin/python benchmarks/merge_fmnist.py --threads 1             # hours on one busy core
    .venv/bin/python benchmarks/merge_fmnist.py --train-limit 3000 --test-limit 1000 --epochs-original 1
    # or the variants in two processes, then one report:
    .venv/bin/python benchmarks/merge_fmnist.py --threads 1 --variants merged --out /tmp/m
    .venv/bin/python benchmarks/merge_fmnist.py --threads 1 --variants plain --out /tmp/p
    .venv/bin/python benchmarks/merge_fmnist.py --combine /tmp/m.json /tmp/p.json

Writes <out>.json and <out>.md (default benchmarks/results/merge_fmnist.*); the trained original
goes to --cache (never into the repository).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lrdaccel as lrd
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.decomposition.merge_build import merged_like
from lrdaccel.data import standardized_splits
from lrdaccel.measure.counting import count_macs, count_params
from lrdaccel.measure.machine import load_average
from lrdaccel.planning import Plan
from lrdaccel.calibration import recalibrate_batchnorm
from lrdaccel.decomposition.build import swap_modules
from lrdaccel.training.evaluate import accuracy
from lrdaccel.training.loop import finetune
from lrdaccel.zoo import BottleneckNet

SCHEDULES = ("none", "rotate", "static")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--epochs-original", type=int, default=3, help="epochs to train the original (default 3)")
    parser.add_argument("--lr-original", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="AdamW peak lr, cosine over one epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=1024, help="training images for the merge (default 1024)")
    parser.add_argument("--phases-per-epoch", type=int, default=12, help="freezing phases per epoch (default 12)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--distill", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--variants", default="plain,merged", help="plain, merged (default both)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lrdaccel_merge_fmnist"),
                        help="where the trained original is kept between runs (not the repository)")
    parser.add_argument("--out", default="benchmarks/results/merge_fmnist")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="only merge the results of runs of the same original (other variants) into --out")
    return parser.parse_args(argv)


def combine(paths: list[str], out: Path) -> dict:
    """One report from runs that trained the same original and measured different variants."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    results = dict(parts[0])
    for part in parts[1:]:
        if part["original"]["accuracy"] != results["original"]["accuracy"]:
            raise SystemExit(f"--combine: {paths[0]} and another file measured different originals")
        results["variants"] = {**results["variants"], **part["variants"]}
        results["runs"] = results["runs"] + part["runs"]
        results["load_average_end"] = part.get("load_average_end")
    results["combined_from"] = paths
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    return results


def train_original(train, test, args) -> tuple[nn.Module, dict]:
    torch.manual_seed(args.seed)
    model = BottleneckNet()
    tag = f"e{args.epochs_original}_lr{args.lr_original:g}_n{len(train)}_s{args.seed}"
    path = Path(args.cache) / f"original_{tag}.safetensors"
    seconds = None
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        start = time.perf_counter()
        finetune(model, train, None, epochs=args.epochs_original, lr=args.lr_original, optimizer="adamw",
                 weight_decay=1e-4, schedule=None, batch_size=args.batch_size, seed=args.seed, device="cpu",
                 progress=False)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.eval()
    acc = accuracy(model, test, progress=False)
    print(f"original: {100 * acc:.2f}% ({args.epochs_original} epochs{'' if seconds is None else f', {seconds:.0f} s'})",
          flush=True)
    return model, {"accuracy": acc, "params": count_params(model), "epochs": args.epochs_original,
                   "train_seconds": seconds}


@torch.no_grad()
def logits_error(model: nn.Module, original: nn.Module, test) -> float:
    images = test.tensors[0]
    model.eval()
    num = den = 0.0
    for i in range(0, len(images), 1000):
        reference = original(images[i:i + 1000])
        num += float((model(images[i:i + 1000]) - reference).square().sum())
        den += float(reference.square().sum())
    return math.sqrt(num / den)


def build(variant: str, original: nn.Module, train, args) -> tuple[nn.Module, dict]:
    """The variant right after decomposition / merging, and what it is."""
    model = copy.deepcopy(original)
    keep = keep_input_layer(1)
    example = train.tensors[0][:1]
    calibration = list(train.tensors[0][:args.calibration].split(args.batch_size))
    start = time.perf_counter()
    if variant == "plain":
        plan = lrd.plan(model, ratio=args.ratio, filter_fn=keep)
        lrd.decompose(model, plan)
    else:
        plan = lrd.plan(model, ratio=args.ratio, filter_fn=keep, merge=True, example_inputs=example)
        if variant == "merged":
            lrd.decompose(model, plan, calibration=calibration)
        else:  # merged shapes, default initialisation, BatchNorms re-estimated: the baseline
            swap_modules(model, {name: module for row in plan.merged for name, module in merged_like(model, row).items()})
            non_merged = Plan([r for r in plan if r.kind != "merged"], ratio=plan.ratio)
            lrd.decompose(model, non_merged)
            recalibrate_batchnorm(model, calibration)
    seconds = time.perf_counter() - start
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return model, {"params": count_params(model), "macs": count_macs(model, example), "convs": convs,
                   "build_seconds": seconds, "merged_blocks": len(plan.merged)}


def run_finetune(model, original, schedule, distill, train, test, args) -> dict:
    """One epoch, stopped at 1/3 (accuracy) and resumed from the checkpoint to the end."""
    steps = math.ceil(len(train) / args.batch_size)
    third = round(steps / 3)
    settings = dict(epochs=1, lr=args.finetune_lr, optimizer="adamw", weight_decay=1e-4,
                    schedule=None if schedule == "none" else schedule,
                    every_steps=max(1, steps // args.phases_per_epoch), batch_size=args.batch_size,
                    seed=args.seed + 1, device="cpu", progress=False)
    points, seconds = [], 0.0
    with tempfile.TemporaryDirectory() as checkpoints:
        for stop in (third, steps):
            start = time.perf_counter()
            finetune(model, train, None, teacher=original if distill else None, max_steps=stop,
                     resume=stop != third, checkpoint_dir=checkpoints, **settings)
            seconds += time.perf_counter() - start
            points.append(accuracy(model, test, progress=False))
    return {"accuracy_third": points[0], "accuracy_epoch": points[1], "epoch_seconds": seconds}


def markdown(results: dict) -> str:
    original = results["original"]
    cfg = results["config"]
    lines = [
        "# Layer merging vs plain LRD on Fashion-MNIST (bottleneck CNN)",
        "",
        f"{results['dataset']['train_size']:,} training / {results['dataset']['test_size']:,} test images; ratio "
        f"{cfg['ratio']:g}; merge calibration {cfg['calibration']} training images; fine-tuning AdamW lr "
        f"{cfg['finetune_lr']:g} cosine over 1 epoch, batch {cfg['batch_size']}, freezing phases switch every "
        f"1/{cfg['phases_per_epoch']} epoch; KD = distillation from the original (0.5 task + 0.5 KL, T=4). "
        f"{results['machine']}; load average {results['load_average']}; {results['created']}.",
        "",
        f"Original: {100 * original['accuracy']:.2f}% ({original['params']:,} parameters, "
        f"{original['epochs']} epochs).",
        "",
        "| variant | params | MACs | convs | right after | logits rel. error |",
        "|---|---|---|---|---|---|",
    ]
    base = results["original"]
    for name, v in results["variants"].items():
        lines.append(f"| {name} | {v['params'] / base['params']:.3f}x | {v['macs'] / base['macs']:.3f}x | "
                     f"{v['convs']} | {100 * v['accuracy']:.2f}% | {v['logits_error']:.3f} |")
    lines += ["", "| variant | freezing | KD | after 1/3 epoch | after 1 epoch | vs original | epoch wall time |",
              "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        gap = 100 * (run["accuracy_epoch"] - original["accuracy"])
        lines.append(f"| {run['variant']} | {run['schedule']} | {'yes' if run['distill'] else 'no'} | "
                     f"{100 * run['accuracy_third']:.2f}% | {100 * run['accuracy_epoch']:.2f}% | {gap:+.2f} pt | "
                     f"{run['epoch_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.combine:
        print(markdown(combine(args.combine, Path(args.out))))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    distills = {"both": (False, True), "yes": (True,), "no": (False,)}[args.distill]
    train, test = standardized_splits("fashion-mnist", args.train_limit, args.test_limit)
    original, summary = train_original(train, test, args)
    summary["macs"] = count_macs(original, train.tensors[0][:1])
    results = {
        "format": "lrdaccel.merge_fmnist", "version": 1, "lrdaccel_version": lrd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "load_average": load_average(),
        "config": vars(args), "dataset": {"train_size": len(train), "test_size": len(test)},
        "original": summary, "variants": {}, "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = {}
    for variant in variants + (["merged, random init"] if "merged" in variants else []):
        model, info = build(variant, original, train, args)
        info.update(accuracy=accuracy(model, test, progress=False), logits_error=logits_error(model, original, test))
        results["variants"][variant] = info
        built[variant] = model
        print(f"{variant}: {100 * info['accuracy']:.2f}% right after, logits error {info['logits_error']:.3f}, "
              f"{info['params']:,} params, {info['convs']} convs", flush=True)
    for variant in variants:
        for schedule in schedules:
            for distill in distills:
                model = copy.deepcopy(built[variant])
                run = {"variant": variant, "schedule": schedule, "distill": distill,
                       **run_finetune(model, original, schedule, distill, train, test, args)}
                results["runs"].append(run)
                print(f"  {variant} {schedule}{' +KD' if distill else ''}: {100 * run['accuracy_third']:.2f}% at 1/3, "
                      f"{100 * run['accuracy_epoch']:.2f}% at 1 epoch, {run['epoch_seconds']:.0f} s", flush=True)
                results["load_average_end"] = load_average()
                out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
