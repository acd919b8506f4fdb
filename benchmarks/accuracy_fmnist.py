"""Accuracy on real data: Fashion-MNIST (full 60k/10k) with a ResNet-style CNN and a small ViT.

For each model: train the original here, decompose it at each ratio (ratio ranks; the layer that
reads the 1-channel image is kept), and fine-tune with no freezing, `rotate` and `static`
freezing, each with and without distillation from the original. Test accuracy is evaluated
every 1/--evals-per-epoch of an epoch; a run stops once it is within --target points of the
original or after --max-epochs. Reported: accuracy right after decomposition, when the run
stopped and the best seen, and the epochs and training wall time (evaluation excluded) to come within
the target.

Freezing phases switch at every evaluation (every_steps = an evaluation interval), so rotate
cycles through the factors several times within an epoch.

    .venv/bin/python benchmarks/accuracy_fmnist.py                 # ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/accuracy_fmnist.py --train-limit 2000 --test-limit 500 --models fmnist-cnn

Writes <out>.json, <out>.md and <out>.png (default benchmarks/results/accuracy_fmnist.*).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.data import standardized_splits
from lrdaccel.measure.counting import count_params
from lrdaccel.training.evaluate import accuracy
from lrdaccel.training.loop import finetune as run_finetune

ORIGINAL_TRAINING = {  # epochs and AdamW peak learning rate (cosine decay) to train each original
    "fmnist-cnn": (4, 3e-3),
    "fmnist-vit": (6, 2e-3),
}
SCHEDULES = ("none", "rotate", "static")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist-cnn,fmnist-vit", help="comma-separated: fmnist-cnn, fmnist-vit")
    parser.add_argument("--ratios", default="2,3", help="comma-separated compression ratios (default 2,3)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="none, rotate, static (default all)")
    parser.add_argument("--distill", choices=("both", "yes", "no"), default="both",
                        help="fine-tune with distillation from the original, without, or both (default both)")
    parser.add_argument("--max-epochs", type=float, default=1.0, help="fine-tuning epochs at most (default 1)")
    parser.add_argument("--evals-per-epoch", type=int, default=4, help="test evaluations per epoch (default 4)")
    parser.add_argument("--target", type=float, default=0.5, help="points below the original that count (default 0.5)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="AdamW learning rate, cosine decay (default 5e-4)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (default all 60k)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images (default all 10k)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 avoids OpenMP barrier contention "
                             "on a machine other jobs share)")
    parser.add_argument("--out", default="benchmarks/results/accuracy_fmnist", help="output path without suffix")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def train_original(name: str, train, test, args) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(args.seed)
    model = zoo.get(name).build()
    epochs, lr = ORIGINAL_TRAINING[name]
    start = time.perf_counter()
    run_finetune(model, train, None, epochs=epochs, lr=lr, optimizer="adamw", weight_decay=1e-4, schedule=None,
                 batch_size=args.batch_size, seed=args.seed, device="cpu", progress=not args.no_progress)
    seconds = time.perf_counter() - start
    acc = accuracy(model, test, progress=False)
    print(f"{name}: original {100 * acc:.2f}% after {epochs} epochs ({seconds:.0f} s)", flush=True)
    return model, {"epochs": epochs, "lr": lr, "accuracy": acc, "train_seconds": seconds,
                   "params": count_params(model)}


def finetune(original, ratio, schedule, distill, train, test, target_acc, args) -> dict:
    """Decompose a copy of `original` and fine-tune it with lrdaccel's loop, stopping at each
    evaluation point (max_steps) and resuming from its checkpoint (exact), until within target."""
    model = copy.deepcopy(original)
    in_channels = train.tensors[0].shape[1]
    report = lrd.decompose(model, lrd.plan(model, ratio=ratio, filter_fn=keep_input_layer(in_channels)))
    after_decompose = accuracy(model, test, progress=False)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    eval_every = math.ceil(steps_per_epoch / args.evals_per_epoch)
    total_steps = round(args.max_epochs * steps_per_epoch)
    curve, train_seconds, reached = [], 0.0, None
    label = f"ratio {ratio:g} {schedule}{' +KD' if distill else ''}"
    with tempfile.TemporaryDirectory() as checkpoints:
        settings = dict(epochs=math.ceil(args.max_epochs), lr=args.finetune_lr, optimizer="adamw", weight_decay=1e-4,
                        schedule=None if schedule == "none" else schedule, every_steps=eval_every,
                        batch_size=args.batch_size, seed=args.seed + 1, checkpoint_dir=checkpoints, device="cpu",
                        progress=not args.no_progress)
        for stop in range(eval_every, total_steps + eval_every, eval_every):
            stop = min(stop, total_steps)
            start = time.perf_counter()
            run_finetune(model, train, None, teacher=original if distill else None, max_steps=stop,
                         resume=stop > eval_every, **settings)
            train_seconds += time.perf_counter() - start
            acc = accuracy(model, test, progress=False)
            epoch = stop / steps_per_epoch
            curve.append({"epoch": epoch, "step": stop, "accuracy": acc, "train_seconds": train_seconds})
            if acc >= target_acc:
                reached = {"epochs": epoch, "train_seconds": train_seconds}
                break
    result = {
        "ratio": ratio, "schedule": schedule, "distill": distill,
        "params": report.model_params_after, "params_ratio": report.model_params_after / report.model_params_before,
        "accuracy_after_decompose": after_decompose, "accuracy": curve[-1]["accuracy"],
        "best_accuracy": max(point["accuracy"] for point in curve), "reached_target": reached,
        "epochs_run": curve[-1]["epoch"], "train_seconds": train_seconds, "curve": curve,
    }
    status = (f"within target at epoch {reached['epochs']:.2f} ({reached['train_seconds']:.0f} s)" if reached
              else f"not within target after {result['epochs_run']:.2f} epochs")
    print(f"  {label}: {100 * after_decompose:.2f}% -> {100 * result['accuracy']:.2f}%, {status}", flush=True)
    return result


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [
        "# Fashion-MNIST accuracy after decomposition and fine-tuning",
        "",
        f"{results['dataset']['train_size']:,} training / {results['dataset']['test_size']:,} test images; "
        f"fine-tuning AdamW lr {config['finetune_lr']:g} (cosine over {config['max_epochs']:g} epoch), batch "
        f"{config['batch_size']}, evaluated every 1/{config['evals_per_epoch']} epoch, stopped once within "
        f"{config['target']:g} points of the original. Freezing phases switch at every evaluation. KD: "
        f"distillation from the original (lrdaccel.finetune defaults: 0.5 task loss + 0.5 KL at temperature 4). "
        f"Time: training wall time, evaluation excluded. {results['machine']}; {results['created']}.",
    ]
    for model in results["models"]:
        original = model["original"]
        lines += [
            "",
            f"## {model['name']}: original {100 * original['accuracy']:.2f}% "
            f"({original['params']:,} parameters, {original['epochs']} epochs, {original['train_seconds']:.0f} s)",
            "",
            "| ratio | freezing | KD | params | after decomposition | accuracy at stop (best) | "
            f"within {config['target']:g} points at epoch | time to target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in model["runs"]:
            reached = run["reached_target"]
            at_epoch = f"{reached['epochs']:.2f}" if reached else f"not within {run['epochs_run']:.2f}"
            to_target = f"{reached['train_seconds']:.0f} s" if reached else "-"
            lines.append(
                f"| {run['ratio']:g} | {run['schedule']} | {'yes' if run['distill'] else 'no'} | "
                f"{run['params_ratio']:.3f}x | {100 * run['accuracy_after_decompose']:.2f}% | "
                f"{100 * run['accuracy']:.2f}% ({100 * run['best_accuracy']:.2f}%) | {at_epoch} | {to_target} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {"none": "tab:blue", "rotate": "tab:orange", "static": "tab:green"}
    markers = ["o", "s", "^", "D"]
    for ax, model in zip(axes[0], models):
        ratios = sorted({run["ratio"] for run in model["runs"]})
        lowest = 100.0
        for run in model["runs"]:
            xs = [0] + [p["epoch"] for p in run["curve"]]
            ys = [100 * run["accuracy_after_decompose"]] + [100 * p["accuracy"] for p in run["curve"]]
            lowest = min(lowest, *ys)
            ax.plot(xs, ys, "-" if run["distill"] else ":", color=colors.get(run["schedule"], "gray"),
                    marker=markers[ratios.index(run["ratio"]) % len(markers)], markersize=4,
                    label=f"ratio {run['ratio']:g}, {run['schedule']}{', KD' if run['distill'] else ''}")
        acc = 100 * model["original"]["accuracy"]
        ax.axhline(acc, color="black", linestyle="--", linewidth=0.8, label="original")
        ax.axhline(acc - results["config"]["target"], color="gray", linestyle=":", linewidth=0.8,
                   label=f"original - {results['config']['target']:g} points")
        ax.set_ylim(lowest - 0.5, acc + 0.5)
        ax.set_title(model["name"])
        ax.set_xlabel("fine-tuning epochs")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        if name not in ORIGINAL_TRAINING:
            raise SystemExit(f"--models: {name!r} is not one of {sorted(ORIGINAL_TRAINING)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    schedules = [s.strip() for s in args.schedules.split(",")]
    if any(s not in SCHEDULES for s in schedules):
        raise SystemExit(f"--schedules: each must be one of {SCHEDULES}, got {schedules}")
    distills = {"both": (False, True), "yes": (True,), "no": (False,)}[args.distill]
    train, test = standardized_splits(args.dataset, args.train_limit, args.test_limit)
    start = time.perf_counter()
    results = {
        "format": "lrdaccel.accuracy", "version": 1, "lrdaccel_version": lrd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "config": {k: v for k, v in vars(args).items() if k != "no_progress"},
        "dataset": {"name": args.dataset, "train_size": len(train), "test_size": len(test)},
        "models": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        original, summary = train_original(name, train, test, args)
        target_acc = summary["accuracy"] - args.target / 100
        runs = [finetune(original, ratio, schedule, distill, train, test, target_acc, args)
                for ratio in ratios for schedule in schedules for distill in distills]
        results["models"].append({"name": name, "description": zoo.get(name).description, "original": summary,
                                  "runs": runs})
        results["seconds"] = time.perf_counter() - start
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))
    print(markdown(results))
    print(f"wrote {out}.json, .md, .png in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
