"""A race on a zoo model and a named task, in one call: the task's data prepared for the model,
and a starting classifier per seed (its new head drawn from the seed). The CLI, the demo and the
benchmarks start races this way."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from lrdaccel import zoo
from lrdaccel._settings import resolve
from lrdaccel.racing.api import race
from lrdaccel.tasks.classifier import make_classifier
from lrdaccel.racing.config import RaceConfig
from lrdaccel.tasks.registry import check_task_model, load_task


def race_on_task(model: str, task: str, variants: str = "original,lrd", *, config: RaceConfig | None = None,
                 base: nn.Module | None = None, image_size: int = 64, max_length: int = 128,
                 train_limit: int | None = None, eval_limit: int | None = None, out: Any = None,
                 progress: bool = True, describe: dict | None = None, save: bool = False, **settings: Any) -> dict:
    """Race `variants` of the zoo model `model` on `task` (lrdaccel.tasks.registry).

    Args:
        base: the model to start from (e.g. trained weights already loaded); default: the zoo's
            `build()` (pretrained where the zoo has real weights).
        image_size, max_length, train_limit, eval_limit: as `load_task`; recorded in the
            results' `data` (with `describe`'s, e.g. the weights file), so that only races on the
            same data are pooled.
        Others: as `lrd.race`.

    Raises:
        ValueError: an unknown model, task or variant, or a task the model cannot take; checked
            before the model or the data are loaded where possible; a step count too large to run,
            before the model is built.
    """
    spec = zoo.get(model)
    check_task_model(task, spec)
    data = load_task(task, spec, image_size=image_size, max_length=max_length, train_limit=train_limit,
                     eval_limit=eval_limit)
    resolve(RaceConfig, config, settings, "race").steps(data.size("train"))  # before the model is built
    base = spec.build() if base is None else base
    example, _ = data.batch("train", list(range(min(4, data.size("train")))))

    def start(seed: int) -> tuple[nn.Module, Sequence[str]]:
        return make_classifier(base, example, len(data.classes), seed)

    extra = dict(describe or {})
    settings_used = {"train_limit": train_limit, "eval_limit": eval_limit, "max_length": max_length,
                     "image_size": image_size, **extra.pop("data", {})}
    return race(start, data, variants=variants, config=config, out=out, progress=progress, save=save,
                describe={"model": model, "task": task, "classes": data.classes, "data": settings_used, **extra},
                **settings)
