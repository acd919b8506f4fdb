"""`lrd.race`: fine-tune the original and each variant from the same starting model on the same
batches, and measure who reaches the original's accuracy first.

    import lrdaccel as lrd
    results = lrd.race(classifier, train_set, eval_set, variants="original,lrd",
                       config=lrd.RaceConfig(budget_epochs=1, lr=5e-5), out="race_out/")
    print(results["variants"][1]["speedup_to_target"])

See lrdaccel.racing.runner for how one seed runs, lrdaccel.racing.results for what comes back.
With `out`, each seed's results are written as it finishes (results.json and report.md hold the
seeds finished so far), so an interrupted race keeps them: Ctrl-C raises `RaceInterrupted` (a
KeyboardInterrupt) saying which seeds are in `out`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from lrdaccel._files import check_output_path
from lrdaccel._settings import resolve
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.contestants import VariantSpec
from lrdaccel.tasks.data import RaceData, TensorData
from lrdaccel.racing.report import write_report
from lrdaccel.racing.results import combine, new_header, write_results
from lrdaccel.racing.runner import run_seed
from lrdaccel.racing.saving import save_variants
from lrdaccel.racing.variants import DEFAULT_VARIANTS, parse_variants, reference_first

RESULTS_NAME = "results.json"
StartModel = nn.Module | Callable[[int], tuple[nn.Module, Sequence[str]]]


class RaceInterrupted(KeyboardInterrupt):
    """Ctrl-C during a race: `finished` seeds were written to `out` (None: nothing was written)."""

    def __init__(self, finished: list[int], pending: list[int], out: Path | None):
        super().__init__(f"race interrupted after seeds {finished}")
        self.finished, self.pending, self.out = finished, pending, out


def race(model: StartModel, train_data: Dataset | RaceData, eval_data: Dataset | None = None,
         variants: str | Sequence[VariantSpec] = DEFAULT_VARIANTS, *, config: RaceConfig | None = None,
         keep: Sequence[str] = (), classes: Sequence[str] | None = None,
         transform: Callable[[torch.Tensor], torch.Tensor] | None = None, out: str | Path | None = None,
         describe: dict | None = None, progress: bool = True, trained: dict[str, nn.Module] | None = None,
         save: bool = False, **settings: Any) -> dict:
    """Race the variants from `model`; return the results (and write them to `out`).

    Args:
        model: the starting classifier (inputs -> logits): a pretrained model with its task head,
            or a trained one. Not changed. Or a callable `seed -> (classifier, keep)` that builds
            one per seed (a new head drawn from each seed).
        train_data, eval_data: (input, label) datasets as `lrd.finetune` takes, or one RaceData
            (lrdaccel.tasks.registry.load_task) as `train_data` with `eval_data` None.
        variants: "original,lrd,..." (lrdaccel.racing.variants) or parsed specs; `original` must
            be among them; the reference is the original variant first at the target.
        config: a RaceConfig; keyword `settings` override its fields.
        keep: module names no variant compresses (a freshly initialised head).
        classes: label names (default: 0..n-1 from the labels seen).
        transform: applied to every batch of inputs (e.g. resizing for an ImageNet model).
        out: a folder for results.json, report.md and race.png (created; checked before work).
        describe: extra fields for the results (model and task names).
        progress: tqdm bars.
        trained: a dict that receives each variant's trained model, as served, by name (the last
            seed's), for what comes after the race (saving, exporting, more timing).
        save: keep every trained variant (the last seed's) under `out/models/` (lrdaccel.racing.saving).

    Returns:
        The results dict (lrdaccel.racing.results): target_accuracy, reference, variants with
        params, lr_multiplier, final_accuracy (+ _se), train_seconds, curve, time_to_target_s
        (+ _interval_s), speedup_to_target, infer_speedup, verdict.

    Raises:
        ValueError: a bad setting or variant, no `original`, empty data, fewer than two classes,
            a step count over RaceConfig's limit, `save` without `out`.
        RaceInterrupted: Ctrl-C; the seeds finished before it are in `out`.
    """
    config = resolve(RaceConfig, config, settings, "race")
    specs = parse_variants(variants) if isinstance(variants, str) else reference_first(list(variants))
    data = train_data if isinstance(train_data, RaceData) else _tensor_data(train_data, eval_data, classes, transform)
    for split in ("train", "eval"):
        if data.size(split) == 0:
            raise ValueError(f"race: the {split} data is empty")
    if len(data.classes) < 2:
        raise ValueError(f"race: a classification task needs at least two classes, got {len(data.classes)}")
    config.steps(data.size("train"))  # a budget too large to run is refused before any model is built
    if save and out is None:
        raise ValueError("race: save=True keeps the trained variants under out/models/: give out")
    if out is not None:
        out = Path(out)
        check_output_path(out, directory=True)
    header = {**new_header(dataclasses.asdict(config), config.device), **_data_header(data), **(describe or {}),
              "seeds_planned": config.seeds}
    trained = {} if save and trained is None else trained
    numbers, seeds = list(range(config.seed, config.seed + config.seeds)), []
    try:
        for seed in numbers:
            start, start_keep = model(seed) if callable(model) and not isinstance(model, nn.Module) else (model, keep)
            seeds.append(run_seed(start, data, specs, config, seed, list(start_keep), progress=progress,
                                  trained=trained))
            results = combine(seeds, {**header, "config": {**header["config"], "seeds": len(seeds)}})
            if out is not None:
                _write(results, out)
    except KeyboardInterrupt:
        done = [seed["seed"] for seed in seeds]
        raise RaceInterrupted(done, numbers[len(done):], out if done and out is not None else None) from None
    if save:
        results["saved"] = save_variants(trained, start, list(start_keep), data, results, out)
        _write(results, out)
    return results


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out / RESULTS_NAME)
    write_report(results, out)


def _data_header(data: RaceData) -> dict:
    """What says which data the race ran on, for pooling only like with like (racing.pooling)."""
    labels = data.labels("eval").to(torch.int64).numpy().tobytes()
    overlap = data.overlap  # a text task's eval texts that are also training texts: memory, not generalisation
    return {"train_items": data.size("train"), "eval_items": data.size("eval"),
            "eval_labels_sha256": hashlib.sha256(labels).hexdigest(), "conflicts_dropped": data.conflicts,
            "overlap": None if overlap is None else {"count": overlap.count, "eval_items": overlap.eval_items,
                                                     "share": overlap.share}}


def _tensor_data(train: Dataset, evaluation: Dataset | None, classes: Sequence[str] | None,
                 transform: Callable | None) -> TensorData:
    if evaluation is None:
        raise ValueError("race: give eval_data (held-out (input, label) pairs), or a RaceData as train_data")
    data = TensorData(train, evaluation, [], transform)
    if classes is None:
        labels = torch.cat([data.labels("train"), data.labels("eval")])
        classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    data.classes = list(classes)
    return data
