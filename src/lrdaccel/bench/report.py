"""Turn a results JSON (bench or demo) into a Markdown report and a PNG bar chart.

The numbers are the results file's; this module only formats and draws them, so a report can be
re-drawn from a committed results file (`lrdaccel bench --report results.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lrdaccel.bench.demo_report import demo_markdown, demo_plot
from lrdaccel.bench.formatting import machine_line, ratio_text, si, table
from lrdaccel.bench.schema import BENCH_FORMAT, check_results

MARKDOWN_NAME = "report.md"
PLOT_NAME = "report.png"


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
        machine_line(results),
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
            f"Original: {base['params']:,} parameters, {si(base['macs'] / batch)} MACs per item, "
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
        body = []
        for row in rows:
            infer = ratio_text(row["infer_ratio"])
            if row.get("infer_measured_as", row["variant"]) != row["variant"]:
                infer += " *"
            cells = [row["label"], f"{row['params_ratio']:.3f}x", f"{row['macs_ratio']:.3f}x", infer]
            if trains:
                phases = f" [{row['train_phases']} phases]" if row["train_phases"] > 1 else ""
                cells.append(ratio_text(row["train_ratio"]) + phases)
            body.append(cells)
        header = ["variant", "parameters", "MACs", "inference throughput"] + (["training throughput"] if trains else [])
        lines += table(header, body)
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
                             f"`{b['ours']}` ({b['ours_items_per_s']['median']:.1f}/s)", ratio_text(b["ratio"])])
    return ["", "## Our best vs the original's best", "",
            "Each side in the runtime where it ran fastest (median), `runtime/variant`; the ratio per repeat of "
            "the same interleaved run.", ""] + table(
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
                "over the freezing cycle; under onnxruntime its own profiler, per ONNX operator):", ""] + table(
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
