"""One page from a `gpu_check.sh` output folder: the steps (status, seconds), every bench table
(checked against the results schema), and issue 21's targets, met or missed, with the numbers.

    python benchmarks/gpu_summary.py OUT_DIR [--smoke]

Writes OUT_DIR/summary.md and prints it. Exits 1 if a results file does not parse or a step
failed; a missed target is a measurement, not a failure. In a smoke run (CPU, toy models) the
targets are not judged: the figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from xml.etree import ElementTree

from lrdaccel.bench.report import runtime_heading
from lrdaccel.bench.schema import load_results

# (model, runtime, batch, row, step, at least): issue 21's targets on the GPU (ratio 2, bf16,
# channels_last). Paper A's headline is both techniques combined; Paper B's merging row is ours.
TARGETS = [
    ("resnet50", "eager", 256, "lrd_both", "train", 1.60),
    ("resnet50", "eager", 256, "lrd_both", "infer", 1.37),
    ("resnet50", "eager", 256, "lrd_merge", "train", 1.44),
    ("resnet50", "eager", 256, "lrd_merge", "infer", 1.41),
    ("vit-b16", "eager", 256, "lrd_both", "train", 1.30),
    ("vit-b16", "eager", 256, "lrd_both", "infer", 1.30),
]
AHEAD_UNDER_COMPILE = ("resnet50", "vit-b16")  # "ahead under compile": our best row above 1.0


def _ratio(spread: dict | None) -> str:
    return "-" if not spread else f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def read_steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_counts(out: Path) -> str | None:
    """'12 passed, 0 failed, 30 skipped' from the tests step's JUnit XML, or None."""
    path = out / "tests.xml"
    if not path.is_file():
        return None
    suites = ElementTree.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    tests, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped"


def read_tables(out: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(folder, model entry)] from every bench results.json under OUT/bench, [problems])."""
    tables, problems = [], []
    for path in sorted((out / "bench").glob("*/results.json")):
        try:
            results = load_results(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        tables += [(path.parent.name, model) for model in results["models"]]
    return tables, problems


def table_lines(folder: str, model: dict) -> list[str]:
    lines = [f"### {model['name']}, {runtime_heading(model)}, batch {model['batch_size']} (`bench/{folder}`)", "",
             "| row | parameters | inference | training |", "|---|---|---|---|"]
    for row in model["rows"]:
        lines.append(f"| {row['label']} | {row['params_ratio']:.3f}x | {_ratio(row['infer_ratio'])} | "
                     f"{_ratio(row.get('train_ratio'))} |")
    return lines + [f"Note: {note}." for note in model.get("notes", [])] + [""]


def target_lines(tables: list[tuple[str, dict]]) -> list[str]:
    rows = {(m["name"], m.get("runtime"), m["batch_size"]): {r["variant"]: r for r in m["rows"]} for _, m in tables}
    lines = ["| target | measured (median, min-max) | verdict |", "|---|---|---|"]
    for name, runtime, batch, variant, step, least in TARGETS:
        row = rows.get((name, runtime, batch), {}).get(variant)
        spread = row.get(f"{step}_ratio") if row else None
        verdict = "not measured" if spread is None else ("met" if spread["median"] >= least else "MISSED")
        lines.append(f"| {name} {runtime} b{batch} {variant} {step} >= {least:.2f}x | {_ratio(spread)} | {verdict} |")
    for name in AHEAD_UNDER_COMPILE:
        for (model, runtime, batch), by_variant in sorted(rows.items()):
            if model != name or runtime != "compile":
                continue
            for step in ("infer", "train"):
                ours = {key: r[f"{step}_ratio"] for key, r in by_variant.items()
                        if key != "original" and f"{step}_ratio" in r}
                if ours:
                    key, spread = max(ours.items(), key=lambda item: item[1]["median"])
                    verdict = "met" if spread["median"] > 1.0 else "MISSED"
                    lines.append(f"| {name} compile b{batch} best ({key}) {step} > 1.00x | {_ratio(spread)} | "
                                 f"{verdict} |")
    return lines


def race_lines(out: Path) -> list[str]:
    """The race's variants (time to the original's accuracy, serving speed) from race/results.json."""
    path = out / "race" / "results.json"
    if not path.is_file():
        return []
    try:
        race = json.loads(path.read_text())
        target = race["target_accuracy"]
        said = (f"target accuracy {target:.2f}% (the best original's final minus the margin)" if target is not None
                else f"no target ({race.get('no_target', 'the best original is at or below chance')})")
        lines = [f"{race['model']} on {race['task']}: {said}; details in race/report.md.", "",
                 "| variant | final accuracy | time to target | vs reference | parameters | inference |",
                 "|---|---|---|---|---|---|"]
        for row in race["variants"]:
            reached = "never" if row.get("time_to_target_s") is None else f"{row['time_to_target_s']:.0f} s"
            versus = "-" if row.get("speedup_to_target") is None else f"{row['speedup_to_target']:.2f}x"
            lines.append(f"| {row['name']} | {row['final_accuracy']:.2f}% | {reached} | {versus} | "
                         f"{row['params']:.3f}x | {row['infer_speedup']:.2f}x |")
    except (ValueError, KeyError, TypeError) as error:  # the race's format is its own: show what fails
        lines = [f"race/results.json could not be summarised ({type(error).__name__}: {error}); see race/report.md"]
    return ["## Race", ""] + lines + [""]


def summary(out: Path, smoke: bool) -> tuple[str, bool]:
    steps = read_steps(out)
    tables, problems = read_tables(out)
    machine = out / "machine.md"
    lines = [f"# gpu_check {'smoke run (CPU, toy models: no GPU figures)' if smoke else 'GPU run'}", ""]
    if machine.is_file():
        lines += machine.read_text().splitlines()[2:] + [""]
    lines += ["## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    tests = test_counts(out)
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | "
              f"{s['note'] + (f'; {tests}' if s['step'] == 'tests' and tests else '')} |" for s in steps]
    lines += ["", "## Tables", ""]
    for folder, model in tables:
        lines += table_lines(folder, model)
    lines += race_lines(out)
    if problems:
        lines += ["## Results that do not parse", ""] + [f"- {p}" for p in problems] + [""]
    if not smoke:
        lines += ["## Issue 21's targets", ""] + target_lines(tables) + [""]
    failed = bool(problems) or any(s["status"] in ("failed", "timeout") for s in steps)
    return "\n".join(lines) + "\n", not failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    text, ok = summary(args.out, args.smoke)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps({"ok": ok, "steps": read_steps(args.out)}, indent=2) + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
