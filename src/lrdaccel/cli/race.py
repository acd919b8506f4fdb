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
runs must differ in nothing else, data included) and writes the medians over them. Each seed's
results are written as it finishes; Ctrl-C keeps them (exit 130). `--save` keeps every trained
variant under OUT/models/ (lrdaccel.racing.saving).

The target is the best original variant's final accuracy - 0.5 points; the reference, whose time
to it every speed-up divides, is the original variant that reaches it first. Each variant gets a
one-line verdict that calls no difference within two standard errors a win or a loss.

Variants: `original` (always raced; `original(lr=2)` races too and can be the reference), `lrd` (lrdaccel's best pipeline), and
`lrd(option=value,...)` selecting its parts (each option once): ratio, method (svd|whiten), sequential, allocate
(none|sensitivity), calibration, optimize (none|infer|train), merge, freeze
(none|rotate|static|freeze_one), every_steps, lr (multiplier), kd, exclude, form (factor|narrow), plan
(a plan JSON made beforehand). With lrdaccel[peers]:
`prune(params=lrd|fraction,importance=magnitude|taylor)` (structured channel pruning to the first
lrd variant's parameters, then fine-tuned) and `lora(rank,alpha,ratio)` (LoRA on the layers LRD
decomposes, served merged). `lr` and `kd` apply to every kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrdaccel import zoo
from lrdaccel.cli._common import load_weights, check_outputs, positive_int, threads_type
from lrdaccel.cli._config_args import add_config_args, given
from lrdaccel.measure.machine import busy_warning, set_threads
from lrdaccel.io import file_sha256
from lrdaccel.racing.api import RESULTS_NAME, RaceInterrupted
from lrdaccel.racing.config import LR_SCHEDULES, RaceConfig
from lrdaccel.racing.pooling import pool_runs
from lrdaccel.racing.report import write_report
from lrdaccel.racing.results import load_race, write_results
from lrdaccel.racing.setup import race_on_task
from lrdaccel.tasks.registry import TASKS, check_task
from lrdaccel.racing.variants import DEFAULT_VARIANTS, parse_variants

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
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated, e.g. original,lrd,lrd(ratio=1.5,freeze=static) "
                             f"(default {DEFAULT_VARIANTS})")
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
    parser.add_argument("--save", action="store_true",
                        help="keep every trained variant (the last seed's) under OUT/models/<variant>/, loadable "
                             "with lrd.load / peers.load_pruned (results.json's saved: name -> folder)")
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
    base, weights = None, {"weights": None, "weights_sha256": None}
    if args.weights:
        base = zoo.get(args.model).build()
        load_weights(base, args.weights)
        weights = {"weights": args.weights, "weights_sha256": file_sha256(Path(args.weights))}
    try:
        results = race_on_task(args.model, args.task, args.variants, config=config, base=base,
                               image_size=args.image_size, max_length=args.max_length, train_limit=args.train_limit,
                               eval_limit=args.eval_limit, out=args.out, progress=not args.no_progress,
                               describe={"data": weights}, save=args.save)
    except RaceInterrupted as stop:
        kept = (f"seed(s) {stop.finished} finished and are in {stop.out}/{RESULTS_NAME}; race seed(s) "
                f"{stop.pending} with --seed and pool them with --combine" if stop.out else "no seed finished: "
                "nothing was written")
        print(f"lrdaccel race: interrupted; {kept}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while the model or the data loaded
        print("lrdaccel race: interrupted before any seed finished: nothing was written", file=sys.stderr)
        return 130
    _summary(results, args.out)
    return 0


def _combine(args: argparse.Namespace) -> int:
    check_outputs(dirs={"--out": args.out})
    inputs = [folder for folder in args.combine if Path(folder).resolve() == Path(args.out).resolve()]
    if inputs:
        raise ValueError(f"--out {args.out} is one of the folders to pool (--combine {inputs[0]}): write the pooled "
                         f"results to another folder")
    paths = [Path(folder) / RESULTS_NAME for folder in args.combine]
    results = pool_runs([load_race(path) for path in paths], [str(path) for path in paths])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out / RESULTS_NAME)
    write_report(results, out)
    _summary(results, args.out)
    return 0


def _summary(results: dict, out: str) -> None:
    target = ("no target: " + results["no_target"] if results["no_target"] else
              f"target {results['target_accuracy']:.2f}%, reference {results['reference']}")
    print(target)
    for row in results["variants"]:
        print(row["verdict"])
    drawn = ", race.png" if (Path(out) / "race.png").is_file() else " (no race.png: matplotlib is not installed)"
    print(f"wrote {out}/results.json, report.md{drawn}")
