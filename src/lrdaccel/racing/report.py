"""A race's report: a Markdown summary (`report.md`) and a plot of accuracy against training
seconds (`race.png`), both drawn from results.json alone."""

from __future__ import annotations

from pathlib import Path

from lrdaccel._extras import install_hint, missing
from lrdaccel._files import atomic_write


def _number(value, fmt: str, none: str = "never") -> str:
    return none if value is None else format(value, fmt)


def _speedup(value) -> str:
    return "-" if value is None else ("inf" if value == float("inf") else f"{value:.2f}x")


def _note_trained_original(results: dict) -> list[str]:
    """Where the original is at the target before any training, every other speed-up to the
    target is about 0 (its setup seconds over theirs); say so, and what the race then measures instead."""
    if results["variants"][0]["curve"][0][2] < results["target_accuracy"]:
        return []
    return ["The original is at the target before any training (it was already trained for this task), "
            "so each variant's speed-up to the target is about 0 by definition: this race measures how soon a "
            "compressed model recovers the accuracy, and how much faster it then serves."]


def render_markdown(results: dict) -> str:
    """The summary table (medians over seeds, with spreads), the per-seed table and the curves."""
    config = results["config"]
    seeds = len(results["seeds"])
    lines = [
        f"# Race: {results.get('model', '?')} on {results.get('task', '?')}",
        "",
        f"Budget {config['budget_epochs']:g} epoch(s) ({results['seeds'][0]['steps']} steps of batch "
        f"{config['batch_size']}), AdamW lr {config['lr']:g} ({config['lr_schedule']}), {seeds} seed(s), "
        f"embeddings {'frozen' if config['freeze_embeddings'] else 'trained'} in every variant"
        f"{', compiled' if config['compile'] else ''}{', bf16 autocast' if config['amp'] else ''}; "
        f"device {config['device']}, {results['machine'].get('torch_threads', '?')} thread(s).",
        f"Target: the original's final accuracy - {config['margin']:g} points = "
        f"**{results['target_accuracy']:.2f}%** (median over seeds). Training seconds include each "
        f"variant's setup (factorizing, calibrating, pruning); evaluation is not timed.",
        *_note_trained_original(results),
        "",
        "| variant | params | final accuracy | train s | time to target | speed-up to target | inference speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["variants"]:
        spread = row["spread"]
        accuracy = f"{row['final_accuracy']:.2f}%"
        if seeds > 1:
            accuracy += f" ({spread['final_accuracy']['min']:.2f}-{spread['final_accuracy']['max']:.2f})"
        reached = "" if seeds == 1 else f" ({row['reached_target']}/{seeds} seeds)"
        lines.append(
            f"| {row['name']} | {row['params']:.3f}x | {accuracy} | {row['train_seconds']:.0f} | "
            f"{_number(row['time_to_target_s'], '.0f')}{' s' if row['time_to_target_s'] is not None else ''}"
            f"{reached} | {_speedup(row['speedup_to_target'])} | {row['infer_speedup']:.2f}x |")
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
