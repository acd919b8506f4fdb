"""Turn a results JSON (bench or demo) into a Markdown report and a PNG bar chart.

The numbers are the results file's; this module only formats and draws them, so a report can be
re-drawn from a committed results file (`lrdaccel bench --report results.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lrdaccel.bench.schema import BENCH_FORMAT, check_results

MARKDOWN_NAME = "report.md"
PLOT_NAME = "report.png"


def _si(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _ratio(spread: Mapping) -> str:
    """'1.23x (1.20-1.25)': median, then min-max over the repeats."""
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def _machine_line(results: Mapping) -> str:
    m = results["machine"]
    load = ""
    if "load_average_1m" in m:
        load = f"; load average {m['load_average_1m']:g} at start"
        if "load_average_1m_at_end" in m:
            load += f", {m['load_average_1m_at_end']:g} at end"
    return (f"Machine: {m.get('device_name', m.get('device'))} ({m.get('device')}), {m.get('cpu_count')} CPUs, "
            f"{m.get('torch_threads')} torch threads{load}; torch {m.get('torch')}; lrdaccel "
            f"{results['lrdaccel_version']}; {results['created']}.")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# Bench -------------------------------------------------------------------------------------------

def bench_markdown(results: Mapping) -> str:
    config = results["config"]
    lines = [
        "# lrdaccel bench",
        "",
        f"Ratio {config['ratio']:g}; batch {config['batch_size']}; {config['repeats']} interleaved repeats "
        f"(A B A B ..., {config['warmup']} warm-up call per step); rank optimization objective "
        f"`{config['objective']}`; bf16 autocast {'on' if config['autocast_bf16'] else 'off'}; channels_last "
        f"{'on' if config['channels_last'] else 'off'}; runtimes {', '.join(config.get('runtimes', ['eager']))}"
        f"{'; quick' if config.get('quick') else ''}.",
        _machine_line(results),
        "",
        "Each cell is the ratio to the original in the same runtime: the median over repeats, then min-max. "
        "Throughput above 1 is faster. Training throughput of a freezing row is averaged over one cycle of its "
        "phases. Freezing does not change the inference graph, so freezing rows show the inference of the model "
        "they freeze. Ranks are optimized for each runtime (under onnxruntime for inference).",
    ]
    lines += _best_lines(results.get("best") or [])
    for model in results["models"]:
        rows = model["rows"]
        base = rows[0]
        batch = model["batch_size"]
        plans = model["plans"]
        opt = plans["optimized"]
        runtime = runtime_heading(model)
        trains = "train_ratio" in base
        lines += [
            "",
            f"## {model['name']}, {runtime}",
            "",
            f"{model.get('description', '')}; input {'x'.join(str(s) for s in model['input_shape'])}, batch {batch}. "
            f"Original: {base['params']:,} parameters, {_si(base['macs'] / batch)} MACs per item, "
            f"{base['infer_items_per_s']['median']:.1f} items/s inference"
            + (f", {base['train_items_per_s']['median']:.1f} items/s training." if trains else
               " (inference only here)."),
            f"Rank optimization: {opt['decomposed']} of {opt['candidates']} candidate layers decomposed "
            f"({plans['ratio']['decomposed']} at ratio ranks), {opt['changed_from_ratio_ranks']} changed, "
            f"{opt['kept_as_original_by_search']} kept as the original layer"
            + (f", {opt['seconds']:.0f} s of layer timing" if "seconds" in opt else "")
            + (f"; {len(model['forms'])} layers run in the linear form" if model.get("forms") else "")
            + (f"; ranks searched in `{model['ranks_searched_in']}`"
               if model.get("ranks_searched_in", model.get("runtime", "eager")) != model.get("runtime", "eager") else "")
            + ".",
        ] + ([f"Merging: {plans['merged']['merged']} bottlenecks merged into three narrower convs, "
              f"{plans['merged']['decomposed']} other layers at ratio ranks."] if "merged" in plans else []) + [""]
        table = []
        for row in rows:
            infer = _ratio(row["infer_ratio"])
            if row.get("infer_measured_as", row["variant"]) != row["variant"]:
                infer += " *"
            cells = [row["label"], f"{row['params_ratio']:.3f}x", f"{row['macs_ratio']:.3f}x", infer]
            if trains:
                phases = f" [{row['train_phases']} phases]" if row["train_phases"] > 1 else ""
                cells.append(_ratio(row["train_ratio"]) + phases)
            table.append(cells)
        header = ["variant", "parameters", "MACs", "inference throughput"] + (["training throughput"] if trains else [])
        lines += _table(header, table)
        if any(row.get("infer_measured_as", row["variant"]) != row["variant"] for row in rows):
            lines += ["", "\\* same inference graph as the row it freezes; its measurement is shown."]
        lines += _peer_lines(rows)
        lines += [f"Note: {note}." for note in model.get("notes", [])]
        lines += _profile_table(model.get("profile") or {}, batch)
    return "\n".join(lines) + "\n"


def _peer_lines(rows: list) -> list[str]:
    """How each peer row was built: what was pruned, and how close it came to its LRD row's parameters."""
    lines = []
    for row in rows:
        peer = row.get("peer")
        if not peer:
            continue
        kept = ", ".join(f"`{name}`" for name in peer.get("kept", {}))
        heads = f", attention heads {peer['heads'][0]} -> {peer['heads'][1]}" if peer.get("heads") else ""
        off = peer["params"] / peer["target_params"] - 1
        lines.append(f"{row['label']}: torch-pruning, {peer['importance']} importance, {peer['pruning_ratio']:.1%} of "
                     f"every prunable group's channels removed{heads}" + (f" (kept whole: {kept})" if kept else "")
                     + f"; {peer['params']:,} parameters for {peer['matched_to']}'s {peer['target_params']:,} "
                     f"({off:+.1%}), found in {peer['trials']} trials, {peer['seconds']:.0f} s.")
    return [""] + lines if lines else []


def runtime_heading(model: Mapping) -> str:
    """"eager", "compile", "compile (reduce-overhead)": a compile table names the mode it ran in."""
    runtime = model.get("runtime", "eager")
    mode = model.get("compile_mode", "default")
    return f"{runtime} ({mode})" if runtime == "compile" and mode != "default" else runtime


def _best_lines(best: list) -> list[str]:
    """Our best (a decomposed model in its fastest runtime) vs the original in its fastest runtime."""
    if not best:
        return []
    rows = []
    for entry in best:
        for what, label in (("infer", "inference"), ("train", "training")):
            if what in entry:
                b = entry[what]
                rows.append([entry["name"], label, f"`{b['original']}` ({b['original_items_per_s']['median']:.1f}/s)",
                             f"`{b['ours']}` ({b['ours_items_per_s']['median']:.1f}/s)", _ratio(b["ratio"])])
    return ["", "## Our best vs the original's best", "",
            "Each side in the runtime where it ran fastest (median), `runtime/variant`; the ratio per repeat of "
            "the same interleaved run.", ""] + _table(
        ["model", "step", "original, its best runtime", "ours, its best runtime", "ours / original"], rows)


def _profile_table(profile: Mapping, batch: int, limit: int = 8) -> list[str]:
    """The operators that take the most time, original vs LRD + both, ms per step (torch.profiler)."""
    if not profile:
        return []
    keys = ["original"] + [key for key in profile if key != "original"][:1]
    labels = {"original": "original", "lrd_both": "LRD + both", "lrd_opt": "LRD + rank optimization",
              "lrd_merge": "LRD + merging", "lrd": "LRD"}
    columns = [(key, what) for what in ("infer", "train") for key in keys if what in profile[key]]
    cells = {(key, what): {entry["op"]: entry["ms"] for entry in profile[key][what]} for key, what in columns}
    ops = []
    for column in sorted(columns, key=lambda c: c[0] != "original"):
        for op in sorted(cells[column], key=cells[column].get, reverse=True)[:limit]:
            if op not in ops:
                ops.append(op)
    rows = [[f"`{op}`"] + [f"{cells[c][op]:.1f}" if op in cells[c] else "-" for c in columns] for op in ops]
    totals = ["total of the listed"] + [f"{sum(cells[c].get(op, 0.0) for op in ops):.1f}" for c in columns]
    return ["", f"Where the time goes (profiler self time, ms per step of batch {batch}; training averaged "
                "over the freezing cycle; under onnxruntime its own profiler, per ONNX operator):", ""] + _table(
        ["operator"] + [f"{labels.get(key, key)} {what}" for key, what in columns], rows + [totals])


def bench_plot(results: Mapping, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    labels = list(dict.fromkeys(row["label"] for m in models for row in m["rows"]))  # every row, in order
    peers = {row["label"] for m in models for row in m["rows"] if row.get("peer")}
    legend_rows = -(-len(labels) // 3)  # the legend goes below the bars, three labels a line
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3 * len(models) + 4), 4.5 + 0.2 * legend_rows), sharey=True)
    width = 0.8 / len(labels)
    for ax, key, title in ((axes[0], "infer_ratio", "inference throughput"),
                           (axes[1], "train_ratio", "training throughput")):
        for i, label in enumerate(labels):
            medians, low, high = [], [], []
            for model in models:  # a runtime without training (onnxruntime) or a row leaves a gap
                spread = next((r[key] for r in model["rows"] if r["label"] == label and key in r), None)
                medians.append(spread["median"] if spread else float("nan"))
                low.append(spread["median"] - spread["min"] if spread else 0.0)
                high.append(spread["max"] - spread["median"] if spread else 0.0)
            xs = [m + (i - (len(labels) - 1) / 2) * width for m in range(len(models))]
            ax.bar(xs, medians, width, yerr=[low, high], capsize=2, label=label,
                   hatch="//" if label in peers else None)  # a peer's row, not ours
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(models)), [f"{m['name']}\n{runtime_heading(m)}" for m in models])
        ax.set_title(f"{title} / original, same runtime")
    axes[0].set_ylabel("ratio to the original (median, min-max)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"lrdaccel bench, ratio {results['config']['ratio']:g}, {results['machine']['device_name']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# Demo --------------------------------------------------------------------------------------------

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
        _machine_line(results),
        "",
    ]
    lines += _table(["", "original", "decomposed", "decomposed / original"], [
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
    lines += _table(["epoch", "freezing phases", "trainable share", "train loss", "test accuracy", "seconds"], [
        [h["epoch"], ", ".join(str(p) for p in h["phases"]), f"{100 * h['trainable_share']:.1f}%", f"{h['loss']:.4f}",
         f"{100 * h['accuracy']:.2f}%", f"{h['seconds']:.1f}"] for h in decomposed["history"]])
    lines += ["", "## Layers", ""]
    lines += _table(["layer", "ratio rank", "chosen", "reason"], [
        [row["name"], _rank(row["ratio_rank"]), _rank(row["rank"]) if row["kind"] != "keep" else "original",
         row["reason"]] for row in decomposed["layers"]])
    lines += ["", "## Time per stage", ""]
    lines += _table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in results["stages"].items()])
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
                         _ratio(ratio) if ratio else "-"])
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


# Entry points ------------------------------------------------------------------------------------

def render_markdown(results: Mapping) -> str:
    """The Markdown report of a checked results dict (bench or demo)."""
    results = check_results(results)
    return (bench_markdown if results["format"] == BENCH_FORMAT else demo_markdown)(results)


def write_report(results: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write `report.md` and `report.png` into `out_dir`; returns their paths.

    Raises:
        ValueError: the results are not well-formed (the message names the key).
    """
    results = check_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / MARKDOWN_NAME
    markdown.write_text(render_markdown(results))
    plot = bench_plot if results["format"] == BENCH_FORMAT else demo_plot
    return {"markdown": markdown, "plot": plot(results, out_dir / PLOT_NAME)}
