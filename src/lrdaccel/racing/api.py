"""`lrd.race`: fine-tune the original and each variant from the same starting model on the same
batches, and measure who reaches the original's accuracy first.

    import lrdaccel as lrd
    results = lrd.race(classifier, train_set, eval_set, variants="original,lrd",
                       config=lrd.RaceConfig(budget_epochs=1, lr=5e-5), out="race_out/")
    print(results["variants"][1]["speedup_to_target"])

See lrdaccel.racing.runner for how one seed runs, lrdaccel.racing.results for what comes back.
"""

from __future__ import annotations

import dataclasses
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
from lrdaccel.racing.variants import parse_variants, reference_first

RESULTS_NAME = "results.json"
StartModel = nn.Module | Callable[[int], tuple[nn.Module, Sequence[str]]]


def race(model: StartModel, train_data: Dataset | RaceData, eval_data: Dataset | None = None,
         variants: str | Sequence[VariantSpec] = "original,lrd", *, config: RaceConfig | None = None,
         keep: Sequence[str] = (), classes: Sequence[str] | None = None,
         transform: Callable[[torch.Tensor], torch.Tensor] | None = None, out: str | Path | None = None,
         describe: dict | None = None, progress: bool = True, trained: dict[str, nn.Module] | None = None,
         **settings: Any) -> dict:
    """Race the variants from `model`; return the results (and write them to `out`).

    Args:
        model: the starting classifier (inputs -> logits): a pretrained model with its task head,
            or a trained one. Not changed. Or a callable `seed -> (classifier, keep)` that builds
            one per seed (a new head drawn from each seed).
        train_data, eval_data: (input, label) datasets as `lrd.finetune` takes, or one RaceData
            (lrdaccel.tasks.registry.load_task) as `train_data` with `eval_data` None.
        variants: "original,lrd,..." (lrdaccel.racing.variants) or parsed specs; `original` is the
            reference and must be among them.
        config: a RaceConfig; keyword `settings` override its fields.
        keep: module names no variant compresses (a freshly initialised head).
        classes: label names (default: 0..n-1 from the labels seen).
        transform: applied to every batch of inputs (e.g. resizing for an ImageNet model).
        out: a folder for results.json, report.md and race.png (created; checked before work).
        describe: extra fields for the results (model and task names).
        progress: tqdm bars.
        trained: a dict that receives each variant's trained model, as served, by name (the last
            seed's), for what comes after the race (saving, exporting, more timing).

    Returns:
        The results dict (lrdaccel.racing.results): target_accuracy, variants with params,
        final_accuracy, train_seconds, curve, time_to_target_s, speedup_to_target, infer_speedup.

    Raises:
        ValueError: a bad setting or variant, no `original`, empty data, fewer than two classes.
    """
    config = resolve(RaceConfig, config, settings, "race")
    specs = parse_variants(variants) if isinstance(variants, str) else reference_first(list(variants))
    data = train_data if isinstance(train_data, RaceData) else _tensor_data(train_data, eval_data, classes, transform)
    for split in ("train", "eval"):
        if data.size(split) == 0:
            raise ValueError(f"race: the {split} data is empty")
    if len(data.classes) < 2:
        raise ValueError(f"race: a classification task needs at least two classes, got {len(data.classes)}")
    if out is not None:
        out = Path(out)
        check_output_path(out, directory=True)
    seeds = []
    for seed in range(config.seed, config.seed + config.seeds):
        start, start_keep = model(seed) if callable(model) and not isinstance(model, nn.Module) else (model, keep)
        seeds.append(run_seed(start, data, specs, config, seed, list(start_keep), progress=progress, trained=trained))
    results = combine(seeds, {**new_header(dataclasses.asdict(config), config.device), **(describe or {})})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_results(results, out / RESULTS_NAME)
        write_report(results, out)
    return results


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
