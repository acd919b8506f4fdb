"""Fashion-MNIST: accuracy and wall time of fine-tuning a decomposed CNN with and without freezing.

    .venv/bin/python benchmarks/freezing_fmnist.py [--pretrain-epochs 2] [--epochs 2] [--phases-per-epoch 3]

The zoo's fmnist-cnn (a small ResNet: 3x3 convs 32-64-128 wide, 1x1 shortcuts, linear head) is
trained here from random init on the full 60k training images, then decomposed at ratio 2
(Tucker-2 for the 3x3 convs, SVD for the 1x1 convs and the head) and fine-tuned from that same
decomposed copy, the same number of epochs and with the same data order, three ways: no freezing,
`rotate` and `static`. Rotate switches `--phases-per-epoch` times per epoch (every_steps), so
that even a short run trains every factor of the Tucker-2 layers. Test accuracy is on the full
10k test images after every epoch; wall time is the training time of each epoch (evaluation
excluded). Everything runs through `lrd.finetune`, like `lrdaccel finetune` does.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import data, zoo
from lrdaccel.training.evaluate import accuracy
from lrdaccel.training.loop import finetune

RESULTS = Path(__file__).with_name("results")
SCHEDULES = (None, "rotate", "static")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="epochs to train the dense CNN (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per schedule (default 2)")
    parser.add_argument("--phases-per-epoch", type=int, default=3, help="rotate switches per epoch (default 3)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads per process "
                             "spin against other processes and run several times slower)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, test = data.standardized_splits("fashion-mnist")
    model = zoo.get("fmnist-cnn").build()
    pretrain = finetune(model, train, test, schedule=None, epochs=args.pretrain_epochs, optimizer="adamw", lr=3e-3,
                        weight_decay=5e-4, batch_size=args.batch, seed=0)
    print(pretrain)
    dense_accuracy = accuracy(model, test, progress=False)

    decomposed = copy.deepcopy(model)
    start = time.perf_counter()
    report = lrd.decompose(decomposed, ratio=2.0)
    decompose_seconds = time.perf_counter() - start
    decomposed_accuracy = accuracy(decomposed, test, progress=False)
    print(f"dense {100 * dense_accuracy:.2f}% -> decomposed {100 * decomposed_accuracy:.2f}% before fine-tuning; "
          f"parameters {report.model_params_before:,} -> {report.model_params_after:,}")

    steps_per_epoch = math.ceil(len(train) / args.batch)
    every_steps = math.ceil(steps_per_epoch / args.phases_per_epoch)
    runs = {}
    for schedule in SCHEDULES:
        student = copy.deepcopy(decomposed)
        history = finetune(student, train, test, schedule=schedule, every_steps=every_steps if schedule == "rotate"
                           else None, epochs=args.epochs, optimizer="adamw", lr=1e-3, weight_decay=5e-4,
                           batch_size=args.batch, seed=1)
        print(f"{schedule or 'none'}:\n{history}")
        runs[schedule or "none"] = history.to_dict()

    results = {
        "benchmark": "freezing_fmnist",
        "model": "zoo fmnist-cnn, trained here from random init",
        "data": {"train": len(train), "test": len(test), "standardised": True},
        "pretrain": {"epochs": args.pretrain_epochs, "optimizer": "adamw", "lr": 3e-3, "history": pretrain.to_dict(),
                     "test_accuracy": dense_accuracy},
        "decomposition": {"ratio": 2.0, "layers": len(report.layers), "params_before": report.model_params_before,
                          "params_after": report.model_params_after, "seconds": decompose_seconds,
                          "test_accuracy_before_finetuning": decomposed_accuracy},
        "finetune": {"epochs": args.epochs, "optimizer": "adamw", "lr": 1e-3, "batch": args.batch,
                     "rotate_every_steps": every_steps, "steps_per_epoch": steps_per_epoch, "runs": runs},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freezing_fmnist.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "freezing_fmnist.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    pre, dec, fine = results["pretrain"], results["decomposition"], results["finetune"]
    lines = [
        f"# Sequential freezing on Fashion-MNIST (CPU, {results['machine']['threads']} threads)",
        "",
        f"fmnist-cnn trained here for {pre['epochs']} epochs on the full {results['data']['train']:,} images: "
        f"test accuracy {100 * pre['test_accuracy']:.2f}%. Decomposed at ratio 2 ({dec['layers']} layers, "
        f"{dec['params_before']:,} -> {dec['params_after']:,} parameters): {100 * dec['test_accuracy_before_finetuning']:.2f}% "
        f"before fine-tuning. Fine-tuned {fine['epochs']} epochs each (AdamW, lr {fine['lr']}, cosine, batch "
        f"{fine['batch']}, same data order); rotate switches every {fine['rotate_every_steps']} steps "
        f"({fine['steps_per_epoch']} per epoch). Accuracy on the full {results['data']['test']:,} test images.",
        "",
        "| schedule | " + " | ".join(f"epoch {e + 1} acc" for e in range(fine["epochs"]))
        + " | mean trainable share | train wall time (s) |",
        "|---|" + "---|" * (fine["epochs"] + 2),
    ]
    for name, run in fine["runs"].items():
        epochs = run["epochs"]
        accs = " | ".join(f"{100 * e['test_accuracy']:.2f}%" for e in epochs)
        share = sum(e["trainable_share"] for e in epochs) / len(epochs)
        wall = sum(e["train_seconds"] for e in epochs)
        lines.append(f"| {name} | {accs} | {100 * share:.1f}% | {wall:.0f} |")
    lines += ["", "Wall times come from a shared, loaded machine; compare them with care (the ResNet-50 "
              "benchmark measures throughput ratios interleaved)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
