"""Accuracy at equal speed (issue 19, part 4): LRD against structured pruning on a Pareto front.

One race per task (lrdaccel.racing): the original, LRD at several ratios (and with its ranks
searched for inference time on this machine, `optimize=infer`), and structured pruning
(torch-pruning, magnitude importance; Taylor at ratio 2's budget) at the parameter fraction of
each plain LRD point. Every variant trains the same steps on the same batches; each served model's
inference speed-up is timed interleaved against the original. Each variant is a point of
(inference speed-up, accuracy), twice: right after it is built (the race's first evaluation,
before any step) and after the fine-tuning budget. A point is on a Pareto front when no other
point is at least as fast and as accurate, and better in one.

Target: on each task no pruning point is both faster and more accurate than LRD's points.

    python benchmarks/peers_pareto.py --task fmnist-cnn --threads 1          # ~20 min (+3 to train the CNN once)
    python benchmarks/peers_pareto.py --task efficientnet-lite0 --threads 1  # 19 min
    python benchmarks/peers_pareto.py --task minilm --threads 1              # 28 min
    python benchmarks/peers_pareto.py --task minilm --quick --threads 1      # a few steps: the path works
    python benchmarks/peers_pareto.py --task fmnist-cnn --render            # redraw from results.json
    python benchmarks/peers_pareto.py --task minilm --serve int8 --threads 1  # served in int8 (issue 29)

Writes OUT/results.json (+ the race's report.md, race.png), OUT/pareto.json, OUT/pareto.png and
OUT/pareto.md; OUT defaults to benchmarks/results/pareto_<task> (--quick: benchmarks/scratch/).
The fmnist-cnn starts from a CNN trained here (benchmarks/starting_models.py, cached); the
others from their pretrained weights with a new head, so right after building every variant is
at chance there and only the after-fine-tuning panel compares them. Times are wall time on one
thread of a shared 2-core machine.

`--serve int8` races with RaceConfig(serve="int8") (lrdaccel.racing.serving): every point's
speed-up is its int8 copy's against the original's int8 copy, and its accuracy after fine-tuning
is the int8 copy's (the float one is kept as `after_finetune_float`); right after building the
accuracy is still the float model's. OUT defaults to benchmarks/results/pareto_<task>_int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lrdaccel as lrd
from lrdaccel import zoo
from lrdaccel.measure.counting import count_params
from lrdaccel.peers import lrd_params
from lrdaccel.racing.config import SERVE_RUNTIMES
from lrdaccel.racing.results import load_race
from lrdaccel.racing.setup import race_on_task
from lrdaccel.tasks.classifier import make_classifier
from lrdaccel.tasks.registry import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from starting_models import trained_fmnist_cnn  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent
STAGES = {"after_build": "right after building", "after_finetune": "after fine-tuning"}
DEFAULT_LRD = "lrd(ratio=2)"  # lrdaccel's default pipeline (LRD_DEFAULTS: whiten, ratio 2)


@dataclass
class TaskSettings:
    """One task's race: the zoo model, the task, its data limits and what every variant shares."""

    model: str
    task: str
    race: dict
    train_limit: int | None = None
    eval_limit: int | None = None
    image_size: int = 64
    ratios: tuple = (1.5, 2.0, 3.0)
    infer_ratios: tuple = (2.0, 3.0)
    trained_start: bool = False  # start from a model trained here (starting_models), not a new head
    quick: dict = field(default_factory=lambda: {"train_limit": 256, "eval_limit": 128})


TASKS = {
    "fmnist-cnn": TaskSettings(
        "fmnist-cnn", "fashion-mnist", train_limit=30000, trained_start=True,
        race={"budget_epochs": 1.0, "batch_size": 128, "eval_batch_size": 500, "lr": 5e-4, "evaluations": 4,
              "infer_repeats": 7}),
    "fmnist-cnn-wide": TaskSettings(  # twice as wide: convolutions, not per-layer overheads, take the time
        "fmnist-cnn-wide", "fashion-mnist", train_limit=30000, trained_start=True,
        race={"budget_epochs": 1.0, "batch_size": 128, "eval_batch_size": 500, "lr": 5e-4, "evaluations": 4,
              "infer_repeats": 7}),
    "efficientnet-lite0": TaskSettings(
        "efficientnet-lite0", "fashion-mnist", train_limit=10000, eval_limit=2000, image_size=48,
        race={"budget_epochs": 1.0, "batch_size": 64, "lr": 5e-4, "evaluations": 4}),
    "minilm": TaskSettings(
        "minilm", "wordnet-supersense", train_limit=8000, eval_limit=1000,
        race={"budget_epochs": 1.0, "batch_size": 32, "lr": 5e-5, "evaluations": 4}),
}
QUICK_RACE = {"max_steps": 3, "evaluations": 1, "calibration_batches": 2, "infer_repeats": 1, "infer_batch_size": 8}


def lrd_fractions(classifier: torch.nn.Module, keep: list[str], ratios) -> dict[float, float]:
    """Whole-model parameter fraction of the LRD variant at each ratio, planned as the race's
    `lrd` builder plans it (the new head kept whole), so that pruning is matched to it."""
    total = count_params(classifier)
    return {ratio: lrd_params(classifier, lrd.plan(classifier, ratio=ratio, exclude=lambda _m, name: name in keep))
            / total for ratio in ratios}


def variants_for(settings: TaskSettings, fractions: dict[float, float], taylor: bool = True) -> str:
    """The race's variants: original; LRD per ratio (and with ranks searched for inference);
    pruning at each LRD fraction (magnitude; Taylor at ratio 2's where asked)."""
    names = ["original"] + [f"lrd(ratio={r:g})" for r in settings.ratios]
    names += [f"lrd(ratio={r:g},optimize=infer)" for r in settings.infer_ratios]
    names += [f"prune(params={fractions[r]:.3f})" for r in settings.ratios]
    if taylor and 2.0 in fractions:
        names.append(f"prune(params={fractions[2.0]:.3f},importance=taylor)")
    return ",".join(names)


def starting_model(settings: TaskSettings, train_limit: int | None, progress: bool) -> tuple[torch.nn.Module, dict]:
    """The model the race starts from, and the LRD parameter fractions pruning is matched to."""
    spec = zoo.get(settings.model)
    if settings.trained_start:
        base = trained_fmnist_cnn(settings.model, train_limit=train_limit, progress=progress)
    else:
        torch.manual_seed(0)
        base = spec.build()
    # the classifier the race builds (same example batch shape, same seed) only to plan LRD on it
    few = load_task(settings.task, spec, image_size=settings.image_size, train_limit=4, eval_limit=4)
    example, _ = few.batch("train", list(range(few.size("train"))))
    classifier, keep = make_classifier(base, example, len(few.classes), seed=0)
    return base, lrd_fractions(classifier, keep, settings.ratios)


def run(name: str, out: Path, *, quick: bool, taylor: bool, progress: bool, seeds: int = 1,
        serve: str = "eager") -> dict:
    settings = TASKS[name]
    limits = settings.quick if quick else {"train_limit": settings.train_limit, "eval_limit": settings.eval_limit}
    base, fractions = starting_model(settings, limits["train_limit"], progress)
    variants = variants_for(settings, fractions, taylor)
    print(f"{name}: LRD parameter fractions {fractions}\nvariants: {variants}")
    race = {**settings.race, "seeds": seeds, "serve": serve, **(QUICK_RACE if quick else {})}
    return race_on_task(settings.model, settings.task, variants, base=base, image_size=settings.image_size,
                        out=out, progress=progress, **limits, **race)


# --- the fronts -------------------------------------------------------------------------------

def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`a` is at least as fast and as accurate as `b`, and strictly better in one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (speed-up, accuracy) points no other point dominates, fastest first."""
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (-points[i][0], points[i][1]))


def quartiles(values: list) -> dict:
    """{"q1", "q3"} of the timing repeats: what the plot and the table show, since one repeat in
    seven caught by another program's burst stretches min-max across the whole plot."""
    present = sorted(v for v in values if v is not None)
    if len(present) < 2:
        return {"q1": present[0] if present else None, "q3": present[-1] if present else None}
    q1, _, q3 = statistics.quantiles(present, n=4, method="inclusive")
    return {"q1": q1, "q3": q3}


def points_of(results: dict) -> list[dict]:
    """One point per variant: its speed-up (median and spread over the timing repeats of one
    seed, or over the seeds), and its accuracy right after building and after fine-tuning (as
    served: in int8 after quantization where the race served int8; the float one beside it)."""
    seeds = results["seeds"]
    points = []
    for i, row in enumerate(results["variants"]):
        speed = seeds[0]["variants"][i]["infer_speedup_spread"] if len(seeds) == 1 else row["spread"]["infer_speedup"]
        points.append({"name": row["name"], "kind": row["kind"], "options": row["options"], "params": row["params"],
                       "infer_speedup": row["infer_speedup"],
                       "infer_speedup_spread": {**{k: speed[k] for k in ("min", "median", "max")},
                                                **quartiles(speed["values"])},
                       "after_build": row["curve"][0][2],
                       "after_finetune": row.get("final_accuracy_served", row["final_accuracy"]),
                       "after_finetune_float": row["final_accuracy"],
                       "setup_seconds": row["setup_seconds"]})
    return points


def compare(points: list[dict], stage: str) -> dict:
    """Fronts of all points, of LRD's and of pruning's at one stage, and who dominates whom."""
    xy = {p["name"]: (p["infer_speedup"], p[stage]) for p in points}
    by_kind = {kind: [p["name"] for p in points if p["kind"] == kind] for kind in ("lrd", "prune")}

    def front(names: list[str]) -> list[str]:
        return [names[i] for i in pareto_front([xy[n] for n in names])]

    def beaten(losers: list[str], winners: list[str]) -> dict[str, list[str]]:
        return {n: hits for n in losers if (hits := [w for w in winners if dominates(xy[w], xy[n])])}

    lrd_front = front(by_kind["lrd"])
    dominated = beaten(by_kind["lrd"], by_kind["prune"])
    return {"front": front(list(xy)), "lrd_front": lrd_front, "prune_front": front(by_kind["prune"]),
            "lrd_dominated_by_prune": dominated, "prune_dominated_by_lrd": beaten(by_kind["prune"], by_kind["lrd"]),
            "default_lrd_dominated": dominated.get(DEFAULT_LRD) if DEFAULT_LRD in xy else None,
            "lrd_front_on_or_beyond_prune": not any(n in dominated for n in lrd_front)}


def pareto(results: dict, fresh_head: bool) -> dict:
    points = points_of(results)
    return {"model": results.get("model"), "task": results.get("task"), "fresh_head": fresh_head,
            "serve": results.get("serve", "eager"), "serve_baseline": results.get("serve_baseline"),
            "config": results["config"], "steps": results["seeds"][0]["steps"], "seeds": len(results["seeds"]),
            "eval_items": results.get("eval_items"), "points": points,
            "stages": {stage: compare(points, stage) for stage in STAGES}}


# --- the report -------------------------------------------------------------------------------

def short(point: dict) -> str:
    """A point's label on the plot: the LRD ratio (+i: ranks searched for inference), the pruned
    fraction (+T: Taylor importance)."""
    options = point["options"]
    if point["kind"] == "lrd":
        return f"{options['ratio']:g}{'+i' if options.get('optimize') == 'infer' else ''}"
    if point["kind"] == "prune":
        return f"{point['params']:.2f}{'+T' if options.get('importance') == 'taylor' else ''}"
    return "orig"


def verdict(comparison: dict, points: list[dict], stage: str) -> str:
    """Which LRD points a pruning point beats at `stage`, with both points' numbers."""
    dominated = comparison["lrd_dominated_by_prune"]
    if not dominated:
        return "no pruning point is both faster and more accurate than any LRD point"
    at = {p["name"]: f"{p['infer_speedup']:.2f}x, {p[stage]:.2f}%" for p in points}
    return "; ".join(f"{name} ({at[name]}) is dominated by " + ", ".join(f"{hit} ({at[hit]})" for hit in hits)
                     for name, hits in dominated.items())


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def markdown(report: dict) -> str:
    config = report["config"]
    points = {p["name"]: p for p in report["points"]}
    stages = report["stages"]
    seeds = "one seed's" if report["seeds"] == 1 else f"medians over {report['seeds']} seeds"
    over = "of the repeats" if report["seeds"] == 1 else "of the seeds' medians"
    int8 = report.get("serve") == "int8"
    served = report["serve_baseline"] if int8 else "the original"
    lines = [f"# Accuracy at equal speed: {report['model']} on {report['task']}", "",
             f"One race: {report['steps']} steps of batch {config['batch_size']} (AdamW lr {config['lr']:g}, "
             f"{config['lr_schedule']}) for every variant on the same batches; inference speed-up of each "
             f"served model over {served}, batch {config['infer_batch_size']}, {config['infer_repeats']} "
             f"interleaved repeats (median (quartiles; min-max) {over}). Fronts and dominance are on the medians; "
             f"accuracies are {seeds}, on {report['eval_items']} held-out items.", ""]
    if report["fresh_head"]:
        lines += ["The start is a pretrained model with a new, untrained head: right after building every "
                  "variant is near chance, so only the after-fine-tuning columns compare them.", ""]
    if int8:
        lines += ["Served in int8: accuracy after fine-tuning is each variant's int8 copy's (float in brackets); "
                  "right after building it is the float model's (the race quantizes only after training).", ""]
    lines += [f"| variant | params | inference speed-up | accuracy right after | accuracy after fine-tuning"
              f"{' (int8; float)' if int8 else ''} | on front (after / FT) | dominated by pruning (after / FT) |",
              "|---|---|---|---|---|---|---|"]
    for name, p in points.items():
        spread = p["infer_speedup_spread"]
        on = " / ".join("yes" if name in stages[s]["front"] else "-" for s in STAGES)
        hit = " / ".join(", ".join(stages[s]["lrd_dominated_by_prune"].get(name, [])) or "-" for s in STAGES)
        finetuned = f"{p['after_finetune']:.2f}%" + (f" ({p['after_finetune_float']:.2f}%)" if int8 else "")
        lines.append(f"| {name} | {p['params']:.3f}x | {p['infer_speedup']:.2f}x ({spread['q1']:.2f}-"
                     f"{spread['q3']:.2f}; {spread['min']:.2f}-{spread['max']:.2f}) | {p['after_build']:.2f}% | "
                     f"{finetuned} | {on} | "
                     f"{hit if p['kind'] == 'lrd' else ''} |")
    lines.append("")
    for stage, title in STAGES.items():
        s = stages[stage]
        lines.append(f"- {title.capitalize()}: LRD's front {', '.join(s['lrd_front'])}; pruning's front "
                     f"{', '.join(s['prune_front'])}. {_sentence(verdict(s, report['points'], stage))}")
    return "\n".join(lines) + "\n"


def front_outline(front: list[tuple[float, float]], corner: tuple[float, float]) -> tuple[list, list]:
    """The edge of what a front's points dominate, as a staircase from the left edge (`corner`'s
    speed-up) to the bottom (`corner`'s accuracy): each step is attained by a point, none is
    promised between them."""
    xs, ys = [], []
    previous = None
    for x, y in sorted(front, key=lambda p: (p[0], -p[1])):
        xs += [corner[0] if previous is None else previous, x]
        ys += [y, y]
        previous = x
    if previous is not None:
        xs.append(previous)
        ys.append(corner[1])
    return xs, ys


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"original": ("k", "*"), "lrd": ("tab:blue", "o"), "prune": ("tab:orange", "^")}
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    over = " in int8, each served in int8" if report.get("serve") == "int8" else ""
    for axis, (stage, title) in zip(axes, STAGES.items()):
        for p in report["points"]:
            color, marker = styles.get(p["kind"], ("grey", "x"))
            spread = p["infer_speedup_spread"]
            axis.errorbar(p["infer_speedup"], p[stage], xerr=[[p["infer_speedup"] - spread["q1"]],
                                                              [spread["q3"] - p["infer_speedup"]]],
                          fmt=marker, color=color, markersize=8, capsize=3,
                          markerfacecolor="white" if p["options"].get("optimize") == "infer" else color)
            axis.annotate(short(p), (p["infer_speedup"], p[stage]), textcoords="offset points", xytext=(5, 4),
                          fontsize=8)
        corner = (min(p["infer_speedup"] for p in report["points"]), min(p[stage] for p in report["points"]))
        for kind, key in (("lrd", "lrd_front"), ("prune", "prune_front")):
            front = [(p["infer_speedup"], p[stage]) for n in report["stages"][stage][key]
                     for p in report["points"] if p["name"] == n]
            axis.plot(*front_outline(front, corner), color=styles[kind][0], alpha=0.5,
                      label=f"{'LRD' if kind == 'lrd' else 'pruning'} front")
        axis.set_title(title)
        axis.set_xlabel(f"inference speed-up over the original{over} (x; bars: quartiles of the repeats)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle(f"{report['model']} on {report['task']}: accuracy against inference speed-up "
                    f"(LRD: ratio, +i ranks searched for inference; pruning: params, +T Taylor)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out: Path, fresh_head: bool) -> dict:
    """pareto.json, pareto.md and pareto.png from OUT/results.json alone."""
    report = pareto(load_race(out / "results.json"), fresh_head)
    (out / "pareto.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "pareto.md").write_text(text)
    plot(report, out / "pareto.png")
    print(text)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(TASKS), default="fmnist-cnn")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few items: the path works end to end")
    parser.add_argument("--render", action="store_true", help="redraw pareto.* from OUT/results.json, no race")
    parser.add_argument("--no-taylor", action="store_true", help="leave out the Taylor-importance pruning point")
    parser.add_argument("--seeds", type=int, default=1, help="races from seeds 0..N-1; medians reported (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", help="default benchmarks/results/pareto_<task> (--quick: benchmarks/scratch/)")
    parser.add_argument("--serve", choices=SERVE_RUNTIMES, default="eager",
                        help="serve, time and score every trained variant as trained (eager) or as its int8 copy "
                             "against the original's (int8; OUT gets an _int8 suffix)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = "scratch/pareto_{}_quick" if args.quick else "results/pareto_{}"
    suffix = "" if args.serve == "eager" else f"_{args.serve}"
    out = Path(args.out) if args.out else ROOT / folder.format(args.task + suffix)
    if not args.render:
        run(args.task, out, quick=args.quick, taylor=not args.no_taylor, progress=not args.no_progress,
            seeds=args.seeds, serve=args.serve)
    write_report(out, fresh_head=not TASKS[args.task].trained_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
