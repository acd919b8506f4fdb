"""The demo's report: what changed (parameters, MACs, throughput per runtime), the race of the
original and the decomposed model through the same fine-tuning, the layers, the deploy step, and
what each stage of the run cost.

It also re-draws results files of earlier demos (`lrdaccel bench --report`), which lack the
fields added since (learning-rate multipliers, CPU seconds, stage parts): those cells say "-"."""

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
        f"{config['epochs']} epochs ({100 * results['pretrained']['accuracy']:.2f}%); decomposed at ratio "
        f"{config['ratio']:g}, "
        + (f"ranks optimized for `{config['objective']}` by timing each layer here"
           + (f" under `{config['runtime']}`" if "runtime" in config else "") if config.get("optimize", True)
           else "at the ratio's ranks")
        + f"; then both fine-tuned {config['finetune_epochs']} more epoch(s) on the same batches, side by side "
        f"(the race below), the decomposed model with `{config['schedule']}` freezing"
        + ("; quick run on a small slice." if config.get("quick") else "."),
        machine_line(results),
        "",
    ]
    lines += table(["", "original", "decomposed", "decomposed / original"], [
        ["parameters", f"{original['params']:,}", f"{decomposed['params']:,}", f"{ratios['params']:.3f}x"],
        ["MACs per image", f"{original['macs']:,}", f"{decomposed['macs']:,}", f"{ratios['macs']:.3f}x"],
        ["test accuracy after the same fine-tuning", f"{100 * original['accuracy']:.2f}%",
         f"{100 * decomposed['accuracy']:.2f}% (right after decomposition: "
         f"{100 * decomposed['accuracy_before_finetune']:.2f}%)", f"{points:+.2f} points"],
    ] + _throughput_rows(throughput, ratios))
    lines += ["", f"Throughput ratios: median (min-max) over {config['repeats']} interleaved repeats, each against the "
                  f"original in the same runtime"
              + (f"; the headline runtime is `{throughput['runtime']}`." if "runtime" in throughput else "."),
              f"Every inference figure of the demo, in these rows and the race's inference speed-up "
              f"([{results['race']['folder']}/report.md]({results['race']['folder']}/report.md), eager), is timed on "
              f"batches of {throughput['batch_size']} images."]
    lines += [f"Note: {note}." for note in results.get("notes", [])]
    lines += _deploy_lines(results.get("deploy"))
    lines += _race_lines(results)
    lines += ["", "## Layers", ""]
    lines += table(["layer", "ratio rank", "chosen", "reason"], [
        [row["name"], _rank(row["ratio_rank"]), _rank(row["rank"]) if row["kind"] != "keep" else "original",
         row["reason"]] for row in decomposed["layers"]])
    lines += _stage_lines(results)
    return "\n".join(lines) + "\n"


def _stage_lines(results: Mapping) -> list[str]:
    """Wall and CPU seconds per stage, what parts of a stage went where, and the whole run."""
    cpu, parts = results.get("stage_cpu_seconds", {}), results.get("stage_parts", {})
    rows = []
    for name, seconds in results["stages"].items():
        rows.append([name, f"{seconds:.1f}", f"{cpu[name]:.1f}" if name in cpu else "-"])
        rows += [[f"&nbsp;&nbsp;of which {label}", f"{part:.1f}", ""] for label, part in parts.get(name, [])]
    total = results.get("total_seconds")
    if total:
        rows.append(["**the whole run** (with saving and counting; until the report)", f"**{total['wall']:.1f}**",
                     f"**{total['cpu']:.1f}**"])
    threads = results["machine"].get("torch_threads", "?")
    return ["", "## Time per stage", "",
            f"Wall seconds are what this run took here; CPU seconds what it asked of the CPU (this process, "
            f"{threads} torch thread(s)). Other work on the machine stretches the wall time, not the CPU time: on an "
            f"idle machine a one-thread run takes about its CPU time.", ""] + table(["stage", "wall s", "CPU s"], rows)


def _race_lines(results: Mapping) -> list[str]:
    """The race: who reached the original's accuracy (minus half a point) in what training time.
    Where the original is at the target before any fine-tuning, a speed-up to the target means
    nothing (the decomposed model's would be 0): the report says so instead of printing one."""
    race, target = results["race"], results["race"]["target_accuracy"]  # None: no target (lrd.race)
    sides = (results["original"], results["decomposed"])
    at_start = [target is not None and side["history"][0]["accuracy"] >= target for side in sides]
    speedups = target is not None and not at_start[0]
    rows = []
    for row, side, started in zip(race["variants"], sides, at_start):
        reached = row["time_to_target_s"]
        multiplier = row.get("lr_multiplier")
        cells = [row["name"], "-" if multiplier is None else f"{multiplier * race['lr']:g} (x{multiplier:g})",
                 f"{100 * side['accuracy']:.2f}%",
                 f"{row['train_seconds']:.0f} (setup {row['setup_seconds']:.0f})",
                 "at the start" if started else "never" if reached is None else f"{reached:.0f} s"]
        if speedups:
            cells.append(_speedup_words(row["speedup_to_target"], started))
        rows.append(cells)
    lines = ["", "## The race", "",
             f"Both models fine-tuned {race['steps']} steps on the same batches in lockstep (lrd.race), each at the "
             f"race's learning rate times its multiplier (column lr); training seconds exclude evaluation and include "
             f"the decomposed model's setup (decomposing, calibrating). "
             + ("No target: the original ends at or below chance. " if target is None else
                f"Target: the original's final accuracy - 0.5 points = {100 * target:.2f}%. ")
             + f"Details: [{race['folder']}/report.md]({race['folder']}/report.md), "
             f"[{race['folder']}/race.png]({race['folder']}/race.png).", ""]
    lines += table(["model", "lr", "test accuracy", "training seconds", "time to target"]
                   + (["speed-up to target"] if speedups else []), rows)
    if at_start[0]:
        decomposed = race["variants"][1]["time_to_target_s"]
        recovered = ("it was at the target from the start too" if at_start[1] else "it never did" if decomposed is None
                     else f"{decomposed:.0f} s of training, setup included")
        lines += ["", "The original is at the target before any fine-tuning (it was trained for this task), so there "
                      "is no time of the original's to compare with and no speed-up to the target: what the race "
                      f"shows is how soon the decomposed model recovers the accuracy ({recovered}) and, above, how "
                      "much faster it then runs."]
    lines += ["", "Test accuracy along the race (training seconds in brackets):", ""]
    original, decomposed = results["original"]["history"], results["decomposed"]["history"]
    lines += table(["step", "original", "decomposed"], [
        [a["step"], f"{100 * a['accuracy']:.2f}% ({a['seconds']:.0f})", f"{100 * b['accuracy']:.2f}% ({b['seconds']:.0f})"]
        for a, b in zip(original, decomposed)])
    return lines


def _speedup_words(speedup: float | None, started: bool) -> str:
    if started:
        return "at the target from the start"
    return "-" if speedup is None else f"{speedup:.2f}x"


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
    for side, style in (("original", "o-"), ("decomposed", "s-")):
        history = results[side]["history"]
        right.plot([h["seconds"] for h in history], [100 * h["accuracy"] for h in history], style, markersize=3,
                   label=side)
    if results["race"]["target_accuracy"] is not None:
        right.axhline(100 * results["race"]["target_accuracy"], color="grey", linestyle="--", linewidth=1,
                      label="target (original's final - 0.5)")
    low = min(100 * h["accuracy"] for side in ("original", "decomposed") for h in results[side]["history"][1:] or
              results[side]["history"])
    right.set_ylim(low - 0.5, 100 * max(results["original"]["accuracy"], results["decomposed"]["accuracy"]) + 0.5)
    right.set_xlabel("training seconds of the same extra fine-tuning (setup included)")
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"the race: {results['model']} on {results['dataset']['name']}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
