"""`lrdaccel race`: fine-tune the original and lrdaccel's variants on a real task, side by side,
and measure who reaches the original's accuracy first (time to accuracy), and how fast each
trained model serves.

Every variant starts from the same pretrained (or --weights) model with the same new head, trains
the same steps on the same batches in the same order, in lockstep (one step of each in turn, so
the machine's load hits all alike). Evaluation is not timed; each variant's setup (factorizing,
calibrating) is. Writes OUT/results.json, OUT/report.md and OUT/race.png.

    lrdaccel race --model minilm --task wordnet-supersense --variants original,lrd --budget-epochs 1 --out race/
    lrdaccel race --model efficientnet-lite0 --task fashion-mnist --image-size 64 --out race_effnet/
    lrdaccel race --model minilm --task my_labels.jsonl --variants "original,lrd(ratio=1.5)" --out mine/

Seeds can run in parallel processes (`--seed 0` in one, `--seed 1` in another, each `--threads 1`)
and be pooled afterwards: `lrdaccel race --combine run0/ run1/ --out both/` pools their seeds (the
runs must differ in nothing else) and writes the medians over them.

Variants: `original` (the reference, always raced), `lrd` (lrdaccel's best pipeline), and
`lrd(option=value,...)` selecting its parts: ratio, method (svd|whiten), sequential, allocate
(none|sensitivity), calibration, optimize (none|infer|train), merge, freeze
(none|rotate|static|freeze_one), every_steps, lr (multiplier), kd, exclude. With lrdaccel[peers]:
`prune(params=lrd|fraction,importance=magnitude|taylor)` (structured channel pruning to the first
lrd variant's parameters, then fine-tuned) and `lora(rank,alpha,ratio)` (LoRA on the layers LRD
decomposes, served merged). `lr` and `kd` apply to every kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrdaccel import zoo
from lrdaccel.cli._common import load_weights, check_outputs, positive_int, threads_type
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.measure.machine import busy_warning, set_threads
from lrdaccel.racing.api import RESULTS_NAME
from lrdaccel.racing.config import LR_SCHEDULES, RaceConfig
from lrdaccel.racing.report import write_report
from lrdaccel.racing.results import load_race, pool_runs, write_results
from lrdaccel.racing.setup import race_on_task
from lrdaccel.tasks.registry import TASKS, check_task
from lrdaccel.racing.variants import parse_variants

ORDER = 55  # after finetune: the whole pipeline against the original


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "race", help="time to accuracy: fine-tune the original and lrdaccel's variants side by side on a real task",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help=f"a zoo name ({', '.join(zoo.names())}; default minilm)")
    parser.add_argument("--weights", help="a .safetensors state dict to start from (default: the zoo's weights)")
    parser.add_argument("--task", default="wordnet-supersense",
                        help=f"{', '.join(TASKS)} (default wordnet-supersense), or a JSONL file with one "
                             '{"text": ..., "label": ..., "split": "train"|"eval"} per line (split optional: '
                             "then 1 in 10 is held out by a hash of the text)")
    parser.add_argument("--variants", default="original,lrd",
                        help="comma-separated, e.g. original,lrd,lrd(ratio=1.5,freeze=static) (default original,lrd)")
    parser.add_argument("--out", "-o", required=True, help="folder for results.json, report.md and race.png")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="instead of racing: pool the seeds of these race folders (same settings, other seeds)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-limit", type=positive_int, help="use only the first N training items")
    data.add_argument("--eval-limit", type=positive_int, help="use only the first N evaluation items")
    data.add_argument("--image-size", type=positive_int, default=64,
                      help="side images are resized to for a 3-channel ImageNet model (default 64)")
    data.add_argument("--max-length", type=positive_int, default=128, help="tokens kept per text (default 128)")
    run = parser.add_argument_group("what every variant shares")
    add_config_args(run, RaceConfig, ("budget_epochs", "max_steps", "batch_size", "eval_batch_size", "lr",
                                      "weight_decay", "lr_schedule", "warmup", "evaluations", "freeze_embeddings",
                                      "compile", "amp", "device", "calibration_batches", "infer_batch_size",
                                      "infer_repeats", "margin", "seed", "seeds"),
                    choices={"lr_schedule": LR_SCHEDULES})
    parser.add_argument("--threads", type=threads_type, default=None,
                        help="torch CPU threads, or 'auto' (default: torch's own choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.combine:
        return _combine(args)
    config = RaceConfig(**given(args, RaceConfig))
    parse_variants(args.variants)  # every variant and option checked before any work
    check_task(args.task)
    zoo.get(args.model)
    check_outputs(dirs={"--out": args.out})
    for message in (set_threads(args.threads), busy_warning()):
        if message:
            print(message)
    base = None
    if args.weights:
        base = zoo.get(args.model).build()
        load_weights(base, args.weights)
    results = race_on_task(args.model, args.task, args.variants, config=config, base=base,
                           image_size=args.image_size, max_length=args.max_length, train_limit=args.train_limit,
                           eval_limit=args.eval_limit, out=args.out, progress=not args.no_progress)
    _summary(results, args.out)
    return 0


def _combine(args: argparse.Namespace) -> int:
    check_outputs(dirs={"--out": args.out})
    paths = [Path(folder) / RESULTS_NAME for folder in args.combine]
    results = pool_runs([load_race(path) for path in paths], [str(path) for path in paths])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out / RESULTS_NAME)
    write_report(results, out)
    _summary(results, args.out)
    return 0


def _summary(results: dict, out: str) -> None:
    for row in results["variants"]:
        reached = ("never reached" if row["time_to_target_s"] is None else
                   f"reached at {row['time_to_target_s']:.0f} s ({row['speedup_to_target']:.2f}x the original)")
        print(f"{row['name']}: final {row['final_accuracy']:.2f}%, target {results['target_accuracy']:.2f}% "
              f"{reached}, params {row['params']:.3f}x, inference {row['infer_speedup']:.2f}x")
    drawn = ", race.png" if (Path(out) / "race.png").is_file() else " (no race.png: matplotlib is not installed)"
    print(f"wrote {out}/results.json, report.md{drawn}")
