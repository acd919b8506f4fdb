"""The demo's report: what changed (parameters, MACs, throughput per runtime), the race of the
original and the decomposed model through the same fine-tuning, the layers, the deploy step."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lrdaccel.bench.formatting import machine_line, ratio_text, table


def demo_markdown(results: Mapping) -> str:
    config, original, decomposed = results["config"], results["original"], results["decomposed"]
    ratios, throughput = results["ratios"], results["throughput"]
    dataset = results["dataset"]
    points = 100 * (decomposed["accuracy"] - original["accuracy"])
    lines = [
        f"# lrdaccel demo: {results['model']} on {dataset['name']}",
        "",
        f"{dataset['train_size']:,} training / {dataset['test_size']:,} test images; original trained "
        f"{config['epochs']} epochs; decomposed at ratio {config['ratio']:g}, "
        + (f"ranks optimized for `{config['objective']}` by timing each layer here"
           + (f" under `{config['runtime']}`" if "runtime" in config else "") if config.get("optimize", True)
           else "at the ratio's ranks")
        + f"; fine-tuned {config['finetune_epochs']} epochs with `{config['schedule']}` freezing"
        + ("; quick run on a small slice." if config.get("quick") else "."),
        machine_line(results),
        "",
    ]
    lines += table(["", "original", "decomposed", "decomposed / original"], [
        ["parameters", f"{original['params']:,}", f"{decomposed['params']:,}", f"{ratios['params']:.3f}x"],
        ["MACs per image", f"{original['macs']:,}", f"{decomposed['macs']:,}", f"{ratios['macs']:.3f}x"],
        ["test accuracy", f"{100 * original['accuracy']:.2f}%",
         f"{100 * decomposed['accuracy']:.2f}% (before fine-tuning: {100 * decomposed['accuracy_before_finetune']:.2f}%)",
         f"{points:+.2f} points"],
    ] + _throughput_rows(throughput, ratios))
    lines += ["", f"Throughput ratios: median (min-max) over {config['repeats']} interleaved repeats, each against the "
                  f"original in the same runtime"
              + (f"; the headline runtime is `{throughput['runtime']}`." if "runtime" in throughput else ".")]
    lines += [f"Note: {note}." for note in results.get("notes", [])]
    lines += _deploy_lines(results.get("deploy"))
    lines += ["", "## Fine-tuning", ""]
    lines += table(["epoch", "freezing phases", "trainable share", "train loss", "test accuracy", "seconds"], [
        [h["epoch"], ", ".join(str(p) for p in h["phases"]), f"{100 * h['trainable_share']:.1f}%", f"{h['loss']:.4f}",
         f"{100 * h['accuracy']:.2f}%", f"{h['seconds']:.1f}"] for h in decomposed["history"]])
    lines += ["", "## Layers", ""]
    lines += table(["layer", "ratio rank", "chosen", "reason"], [
        [row["name"], _rank(row["ratio_rank"]), _rank(row["rank"]) if row["kind"] != "keep" else "original",
         row["reason"]] for row in decomposed["layers"]])
    lines += ["", "## Time per stage", ""]
    lines += table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in results["stages"].items()])
    return "\n".join(lines) + "\n"


def _throughput_rows(throughput: Mapping, ratios: Mapping) -> list[list[str]]:
    """One inference and one training row per runtime (a results file from before runtimes: its one)."""
    by_runtime = throughput.get("by_runtime") or {None: {
        "original": throughput["original"], "decomposed": throughput["decomposed"],
        "infer_ratio": ratios["infer"], "train_ratio": ratios["train"]}}
    rows = []
    for runtime, entry in by_runtime.items():
        for what, label in (("infer", "inference"), ("train", "training")):
            if f"{what}_items_per_s" not in entry["original"]:
                continue
            ratio = entry.get(f"{what}_ratio")
            phases = entry["decomposed"].get("train_phases", 1) if what == "train" else 1
            where = f", {runtime}" if runtime else ""
            rows.append([f"{label} throughput{where} (batch {throughput['batch_size']})",
                         f"{entry['original'][f'{what}_items_per_s']['median']:,.0f} img/s",
                         f"{entry['decomposed'][f'{what}_items_per_s']['median']:,.0f} img/s"
                         + (f" (mean over {phases} freezing phases)" if phases > 1 else ""),
                         ratio_text(ratio) if ratio else "-"])
    return rows


def _deploy_lines(deploy: Mapping | None) -> list[str]:
    if not deploy:
        return []
    if "skipped" in deploy:
        return ["", "## Deploy", "", f"Skipped: {deploy['skipped']}."]
    return ["", "## Deploy", "",
            f"BatchNorm folded into the conv before it in {deploy['folded']} places ({deploy['unfused']} pairs left "
            f"unfused, {deploy['batchnorm_left']} BatchNorm left); exported to `{deploy['file']}` and run in ONNX "
            f"Runtime on batches of {' and '.join(str(b) for b in deploy['batch_sizes'])}: largest difference from "
            f"PyTorch {deploy['max_abs_diff']:.2e} (outputs up to {deploy['max_abs_output']:.3g}), in "
            f"{deploy['seconds']:.1f} s."]


def _rank(rank) -> str:
    if rank is None:
        return "-"
    return str(rank) if isinstance(rank, int) else "x".join(str(r) for r in rank)


def demo_plot(results: Mapping, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    ratios = results["ratios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    runtime = results["throughput"].get("runtime")
    suffix = f"\n({runtime})" if runtime else ""
    measured = {f"inference\nthroughput{suffix}": ratios["infer"], f"training\nthroughput{suffix}": ratios["train"]}
    measured = {name: spread for name, spread in measured.items() if spread is not None}
    names = ["parameters", "MACs"] + list(measured)
    medians = [ratios["params"], ratios["macs"]] + [spread["median"] for spread in measured.values()]
    left.bar(names[:2], medians[:2], color="#7a9")
    spreads = list(measured.values())
    left.bar(names[2:], medians[2:], color="#58c", capsize=3,
             yerr=[[s["median"] - s["min"] for s in spreads], [s["max"] - s["median"] for s in spreads]])
    for x, value in enumerate(medians):
        left.annotate(f"{value:.2f}x", (x, 0), ha="center", va="bottom", fontsize=9, color="white",
                      xytext=(0, 3), textcoords="offset points")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_ylabel("decomposed / original")
    left.set_title("what changed")
    history = results["decomposed"]["history"]
    epochs = [0] + [h["epoch"] for h in history]
    accuracies = [100 * results["decomposed"]["accuracy_before_finetune"]] + [100 * h["accuracy"] for h in history]
    right.plot(epochs, accuracies, marker="o", label="decomposed")
    right.axhline(100 * results["original"]["accuracy"], color="black", linestyle="--", label="original")
    right.set_xlabel("fine-tuning epoch (0: right after decomposition)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"{results['model']} on {results['dataset']['name']}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
