"""A race's report: a Markdown summary (`report.md`) and a plot of accuracy against training
seconds (`race.png`), both drawn from results.json alone."""

from __future__ import annotations

from pathlib import Path

from lrdaccel._extras import install_hint, missing
from lrdaccel._files import atomic_write
from lrdaccel.racing.verdict import interval_text


def _number(value, fmt: str, none: str = "never") -> str:
    return none if value is None else format(value, fmt)


def _speedup(value) -> str:
    return "-" if value is None else ("inf" if value == float("inf") else f"{value:.2f}x")


def _reached(row: dict, results: dict) -> str:
    """When the row reached the target: "at start" (its first evaluation, before any step), the
    interval between the evaluations around the crossing, or never."""
    interval = row.get("time_to_target_interval_s")
    if results.get("no_target"):
        return "no target"
    if interval is None:
        return "never"
    if row["curve"][0][2] >= results["target_accuracy"]:
        return "at start"
    return interval_text(interval)


def _budget(results: dict) -> str:
    """The budget as run: the steps, and the epochs they are (a --max-steps cut says so)."""
    config, seed = results["config"], results["seeds"][0]
    steps, per_epoch = seed["steps"], -(-seed["train_items"] // config["batch_size"])
    text = (f"{steps} steps of batch {config['batch_size']} ({steps / per_epoch:.3g} epoch(s) of "
            f"{seed['train_items']:,} items")
    if config.get("max_steps") and steps == config["max_steps"] and steps < config["budget_epochs"] * per_epoch:
        text += f"; max_steps {steps} cut the {config['budget_epochs']:g}-epoch budget"
    return text + ")"


def _notes(results: dict) -> list[str]:
    """Train/eval overlap and dropped texts, why there is no target or no speed-up, and which
    comparisons mix the learning rate in."""
    lines = []
    overlap = results.get("overlap")
    if overlap and overlap["count"]:
        lines.append(f"Overlap: {overlap['count']} of {overlap['eval_items']} evaluation texts "
                     f"({100 * overlap['share']:.1f}%) also occur among the training texts: accuracy on them "
                     f"measures memory, not generalisation.")
    if results.get("conflicts_dropped"):
        lines.append(f"{results['conflicts_dropped']} text(s) given two or more labels were dropped from the task.")
    if results.get("no_target"):
        lines.append(f"No target: {results['no_target']}. No speed-up to a target is given; compare final "
                     f"accuracies, and train longer or at another learning rate.")
    elif results.get("reference_at_start"):
        lines.append(f"{results['reference']} is at the target at its first evaluation, before any step, so no "
                     f"speed-up to the target is given (each would be about 0): this race measures how soon a "
                     f"changed model gets back to the target, and how much faster it then serves.")
    for name, multiplier in (results.get("uncontrolled_lr") or {}).items():
        lines.append(f"{name} trains at {multiplier:g}x the race's learning rate and no original does: race "
                     f"`original(lr={multiplier:g})` beside it, or its comparison mixes the learning rate in.")
    if any(row.get("vs_reference", {}).get("within_noise") for row in results["variants"]):
        lines.append(f"Differences within two standard errors are within noise: more seeds "
                     f"(--seeds {max(3, 2 * len(results['seeds']))}) or a larger evaluation set tell them apart.")
    return lines


def render_markdown(results: dict) -> str:
    """The verdicts, the summary table (medians over seeds, with spreads), the per-seed table
    and the curves."""
    config = results["config"]
    seeds = len(results["seeds"])
    planned = results.get("seeds_planned", seeds)
    embeddings = ""  # said only of a model that has embeddings (a CNN has none)
    if results["seeds"][0].get("embedding_params"):
        embeddings = f"; embeddings {'frozen' if config['freeze_embeddings'] else 'trained'} in every variant"
    target = ("no target" if results.get("no_target") else
              f"the best original's ({results['best_original']}) final accuracy - {config['margin']:g} points = "
              f"**{results['target_accuracy']:.2f}%** (median over seeds); reference: **{results['reference']}**, "
              f"the original variant first at it")
    lines = [
        f"# Race: {results.get('model', '?')} on {results.get('task', '?')}",
        "",
        *[f"- {row['verdict']}" for row in results["variants"]],
        "",
        f"Budget {_budget(results)}, AdamW lr {config['lr']:g} ({config['lr_schedule']}) times each variant's "
        f"multiplier, {seeds} seed(s){f' of {planned} planned (interrupted)' if planned > seeds else ''}"
        f"{embeddings}"
        f"{', compiled' if config['compile'] else ''}{', bf16 autocast' if config['amp'] else ''}; "
        f"device {config['device']}, {results['machine'].get('torch_threads', '?')} thread(s); "
        f"{results['seeds'][0]['eval_items']:,} evaluation items (chance {results['chance_accuracy']:.2f}%).",
        f"Target: {target}. Training seconds include each variant's setup (factorizing, calibrating, "
        f"pruning); evaluation is not timed; times to the target lie between the two evaluations given.",
        *_notes(results),
        "",
        "| variant | lr x | params | final accuracy ± SE | train s | time to target | speed-up to target "
        "| inference speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["variants"]:
        spread = row["spread"]
        accuracy = f"{row['final_accuracy']:.2f}% ± {row['final_accuracy_se']:.2f}"
        if seeds > 1:
            accuracy += f" ({spread['final_accuracy']['min']:.2f}-{spread['final_accuracy']['max']:.2f})"
        reached = "" if seeds == 1 else f" ({row['reached_target']}/{seeds} seeds)"
        lines.append(
            f"| {row['name']} | {row['lr_multiplier']:g} | {row['params']:.3f}x | {accuracy} | "
            f"{row['train_seconds']:.0f} | {_reached(row, results)}{reached} | {_speedup(row['speedup_to_target'])} "
            f"| {row['infer_speedup']:.2f}x |")
    if seeds > 1:
        lines += ["", "Per seed (time to target s / speed-up / final accuracy):", "",
                  "| variant | " + " | ".join(f"seed {s['seed']}" for s in results["seeds"]) + " |",
                  "|---|" + "---|" * seeds]
        for i, row in enumerate(results["variants"]):
            cells = []
            for seed in results["seeds"]:
                r = seed["variants"][i]
                cells.append(f"{_number(r['time_to_target_s'], '.0f')} / {_speedup(r['speedup_to_target'])} / "
                             f"{r['final_accuracy']:.2f}%")
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if results.get("saved"):
        lines += ["", "Saved (race --save; load with lrdaccel.racing.saving.load_variant):", ""]
        lines += [f"- {name}: `{folder}/`" for name, folder in results["saved"].items()]
    lines += ["", "Accuracy (%) at each evaluation (median over seeds; training seconds in brackets):", ""]
    steps = [point[1] for point in results["variants"][0]["curve"]]
    lines += ["| step | " + " | ".join(row["name"] for row in results["variants"]) + " |",
              "|---|" + "---|" * len(results["variants"])]
    for i, step in enumerate(steps):
        cells = [f"{row['curve'][i][2]:.2f} ({row['curve'][i][0]:.0f})" if i < len(row["curve"]) else "-"
                 for row in results["variants"]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_race(results: dict, path: Path) -> None:
    """Accuracy against training seconds, one line per variant, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for row in results["variants"]:
        seconds = [point[0] for point in row["curve"]]
        accuracy = [point[2] for point in row["curve"]]
        axes.plot(seconds, accuracy, marker="o", markersize=3, label=row["name"])
    if results["target_accuracy"] is not None:
        axes.axhline(results["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
    finals = [row["final_accuracy"] for row in results["variants"]]
    low = min(min(p[2] for p in row["curve"][1:] or row["curve"]) for row in results["variants"])
    axes.set_ylim(max(low, min(finals) - 15), max(finals) + 1)
    axes.set_xlabel("training seconds (setup included, evaluation excluded)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{results.get('model', '')} on {results.get('task', '')}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """report.md and race.png in `out` (results.json is written by the race itself). Without
    matplotlib (lrdaccel[plot]) the plot is skipped and report.md says so."""
    paths = {"report": out / "report.md"}
    text = render_markdown(results)
    module = missing("plot")
    if module is None:
        paths["plot"] = out / "race.png"
        plot_race(results, paths["plot"])
    else:
        text += f"\nrace.png was not drawn: it needs {module}, which is not installed ({install_hint(module)}).\n"
    atomic_write(paths["report"], lambda tmp: Path(tmp).write_text(text))
    return paths
