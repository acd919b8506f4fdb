"""The time-to-accuracy races of BENCHMARKS.md ("Time to accuracy"), with the settings they ran
with, one seed per process so that two seeds run side by side on two cores:

    python benchmarks/time_to_accuracy.py minilm --seed 0 &   python benchmarks/time_to_accuracy.py minilm --seed 1
    python benchmarks/time_to_accuracy.py minilm --combine     # pools the seeds: results/race_minilm/

Each run is `lrdaccel race` (lrdaccel.cli) as a user would type it; this script only fixes the
settings and, for the Fashion-MNIST CNN, first trains the starting model (benchmarks/starting_models.py:
the same model and recipe as `make demo`, 2 epochs on 30,000 images, cached). Results land in
benchmarks/scratch/race_<task>_seed<N>/ and, pooled, in benchmarks/results/race_<task>/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lrdaccel.cli import main  # noqa: E402

# Every setting of each headline race; what the variants mean is in README (lrd.race). These races
# ran when `lrd` and `prune` defaulted to lr x2: the multiplier is written out so that they run as
# they did (their names in results/ are the short ones of then: `lrd` there is `lrd(lr=2)` here).
RACES = {
    "minilm": [
        "--model", "minilm", "--task", "wordnet-supersense", "--train-limit", "20000", "--batch-size", "32",
        "--lr", "1e-4", "--evaluations", "8",
        "--variants", "original,original(lr=2),lrd(lr=2),prune(lr=2),lora",
    ],
    # issue 28: the narrow form against the best original (lr x1 and x2 both raced), at each rate
    "minilm-narrow": [
        "--model", "minilm", "--task", "wordnet-supersense", "--train-limit", "20000", "--batch-size", "32",
        "--lr", "1e-4", "--evaluations", "8",
        "--variants", "original,original(lr=2),lrd(form=narrow),lrd(form=narrow,lr=2)",
    ],
    "effnet": [
        "--model", "efficientnet-lite0", "--task", "fashion-mnist", "--image-size", "48", "--train-limit", "20000",
        "--eval-limit", "2000", "--batch-size", "64", "--lr", "1e-3", "--evaluations", "10",
        "--variants", "original,lrd(lr=2),lrd(optimize=train,lr=2),prune(lr=2),lora",
    ],
    "cnn": [
        "--model", "fmnist-cnn-wide", "--task", "fashion-mnist", "--train-limit", "30000", "--batch-size", "128",
        "--lr", "1e-3", "--lr-schedule", "cosine", "--warmup", "0", "--evaluations", "10",
        "--variants", "original,lrd(lr=2),lrd,lrd(optimize=train,lr=2),prune(lr=2)",
    ],
}
CNN_START = {"model": "fmnist-cnn-wide", "epochs": 2, "train_limit": 30000}


def seed_dir(task: str, seed: int) -> Path:
    return HERE / "scratch" / f"race_{task}_seed{seed}"


def run(task: str, seed: int) -> int:
    arguments = ["race", *RACES[task], "--seed", str(seed), "--threads", "1", "--no-progress",
                 "--out", str(seed_dir(task, seed))]
    if task == "cnn":
        from starting_models import cache_path, trained_fmnist_cnn

        trained_fmnist_cnn(**CNN_START)  # trains it once; the cache file is a plain state dict
        arguments += ["--weights", str(cache_path(**CNN_START))]
    return main(arguments)


def combine(task: str, seeds: list[int]) -> int:
    return main(["race", "--combine", *(str(seed_dir(task, seed)) for seed in seeds),
                 "--out", str(HERE / "results" / f"race_{task}")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(RACES))
    parser.add_argument("--seed", type=int, default=0, help="the seed this process races (default 0)")
    parser.add_argument("--combine", action="store_true", help="pool the seeds run so far instead of racing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to pool (default 0 1)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(combine(args.task, args.seeds) if args.combine else run(args.task, args.seed))
