"""The `lrd` contestant: lrdaccel's pipeline applied to the starting classifier.

Its defaults (`LRD_DEFAULTS`) are the best pipeline the race benchmarks found
(benchmarks/BENCHMARKS.md, "Time to accuracy"), at the race's own learning rate (lr x2 gained
the original as much: BENCHMARKS 10b, 1.01x; and lost on the CNN, 10d); each option selects a part: ratio, method
(svd / whiten), sequential, allocate (sensitivity), calibration (batches), optimize (rank search
for "infer" / "train" on this machine), merge (CNN bottlenecks), freeze (rotate / static /
freeze_one / none) with every_steps (default: six phases over the race), lr (a multiplier of the
race's learning rate), kd (weight of distillation from the starting classifier's logits),
exclude (a full regex of module names kept whole), form (factor: SVD / Tucker-2 factors; narrow:
the widths between layers shrink, the consumers refitted: `lrd.plan(form="narrow")`), plan (a plan
made beforehand: a path to its JSON, or a Plan in Python, e.g. ranks `lrd.optimize_ranks` chose for
another runtime, or a plan for the pretrained model itself, its rows then named as the classifier
holds them; it replaces ratio, allocate, merge, optimize and form).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from lrdaccel._settings import check_choice, check_int
from lrdaccel.decomposition import decompose
from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.racing.contestants import BuildContext, Built
from lrdaccel.rankopt import optimize_ranks
from lrdaccel.tasks.classifier import classifier_plan
from lrdaccel.training.freezer import SCHEDULES, SequentialFreezer

FREEZES = ("none", *SCHEDULES)
LRD_DEFAULTS: dict[str, Any] = {
    "ratio": 2.0, "method": "whiten", "sequential": False, "allocate": "none", "calibration": 16,
    "optimize": "none", "merge": False, "freeze": "none", "every_steps": 0, "lr": 1.0, "kd": 0.0,
    "exclude": "", "plan": "", "form": "factor",
}
LRD_CHOICES = {"method": ("svd", "whiten"), "allocate": ("none", "sensitivity"),
               "optimize": ("none", "infer", "train"), "freeze": FREEZES, "form": ("factor", "narrow")}


def check_lrd_options(options: dict) -> None:
    """Raises ValueError naming the option and its bad value."""
    check_ratio(options["ratio"])
    for key, choices in LRD_CHOICES.items():
        check_choice(key, options[key], choices)
    check_int("calibration", options["calibration"], 1)
    check_int("every_steps", options["every_steps"], 0)
    for key in ("sequential", "merge"):
        if not isinstance(options[key], bool):
            raise ValueError(f"{key} must be true or false, got {options[key]!r}")
    if options["sequential"] and options["method"] != "whiten":
        raise ValueError("sequential=true calibrates the whitened factorization: also give method=whiten")
    if options["form"] == "narrow" and (options["merge"] or options["allocate"] != "none"):
        raise ValueError("form=narrow does not combine with merge=true or allocate=sensitivity")
    if options["form"] == "narrow" and options["freeze"] != "none":
        raise ValueError("form=narrow leaves ordinary layers, with no factors to freeze in turn: give freeze=none")
    if not isinstance(options["exclude"], str):
        raise ValueError(f"exclude must be a regex of module names, got {options['exclude']!r}")
    try:
        re.compile(options["exclude"])
    except re.error as error:
        raise ValueError(f"exclude {options['exclude']!r} is not a regex ({error})") from None
    if options["plan"] != "":
        if not isinstance(options["plan"], (str, Plan)):
            raise ValueError(f"plan must be a plan JSON's path or a Plan, got {type(options['plan']).__name__}")
        planned = {key: options[key] for key in ("ratio", "allocate", "merge", "optimize", "exclude", "form")
                   if options[key] != LRD_DEFAULTS[key]}
        if planned:
            raise ValueError(f"plan= gives the ranks; {sorted(planned)} would plan them again: give one or the other")
        if isinstance(options["plan"], str):
            Plan.load(options["plan"])  # a missing or malformed file is an error before any work


def build_lrd(options: dict, model: nn.Module, context: BuildContext) -> Built:
    """Plan (or take the given plan), decompose on the race's calibration batches, and set up
    freezing."""
    keep, pattern = set(context.keep), options["exclude"]

    def excluded(_module: nn.Module, name: str) -> bool:
        return name in keep or bool(pattern and re.fullmatch(pattern, name))

    calibration = context.calibration[:options["calibration"]]
    if options["plan"] != "":
        plan = options["plan"] if isinstance(options["plan"], Plan) else Plan.load(options["plan"])
        plan = classifier_plan(plan, model)
    else:
        plan = _plan(options, model, context, excluded, calibration)
    needs_batches = options["method"] == "whiten" or options["merge"] or any(row.kind == "narrow" for row in plan)
    decompose(model, plan, method=options["method"], sequential=options["sequential"],
              calibration=calibration if needs_batches else None)
    freezer = None
    if options["freeze"] != "none":
        every = options["every_steps"] or max(1, context.steps // 6)
        freezer = SequentialFreezer(model, schedule=options["freeze"], every_steps=every)
    ranks = {row.name: row.rank for row in plan.changed}
    return Built(model, freezer, options["lr"], options["kd"], notes={"decomposed_layers": len(ranks), "ranks": ranks})


def _plan(options: dict, model: nn.Module, context: BuildContext, excluded, calibration: list) -> Plan:
    # Sensitivity is measured against the starting model's own outputs (distillation Fisher), not the
    # task loss: a race's head is often new, and a random head's loss says nothing about a layer.
    allocating = options["allocate"] == "sensitivity"
    plan = make_plan(model, ratio=options["ratio"], exclude=excluded, merge=options["merge"], form=options["form"],
                     example_inputs=context.example_inputs,
                     **({"allocate": "sensitivity", "calibration": calibration} if allocating else {}))
    if options["optimize"] != "none":
        plan = optimize_ranks(model, plan, context.example_inputs, objective=options["optimize"])
    return plan
