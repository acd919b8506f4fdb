"""The peers as contestants (lrdaccel.peers, `pip install lrdaccel[peers]`):

- `prune`: structured channel pruning (torch-pruning) of the starting classifier, then trained
  as the original is. `params=lrd` (default) matches the whole-model parameters of the race's
  first `lrd` variant; a number in (0, 1) is a fraction of the original's (one the model cannot
  reach, e.g. below what its embeddings alone hold, is refused before any variant is built).
  `importance`: magnitude or taylor (on the race's calibration batches and labels). It trains at
  the race's learning rate (`lr=1`), as `lrd` and the original do.
- `lora`: PEFT LoRA adapters (rank `rank`, scale `alpha`) on the layers LRD decomposes at
  `ratio` (Linear, Conv1D, ungrouped Conv2d), the new head trained in full; served merged, so it serves as fast as the original.
  Its `lr` multiplier defaults to 10 (5e-4 at the race's default 5e-5): adapters start at zero
  and LoRA is run at such rates; at the full model's rate it barely moves.

Both keep the race's head (`BuildContext.keep`) whole. The time pruning takes (its ratio search
included) is the variant's setup, counted as training time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.measure.counting import count_params
from lrdaccel.peers import labelled_loss, lora, merge_lora, prune, require_peers
from lrdaccel.peers.budget import pruning_floor
from lrdaccel.peers.prune_config import PruneConfig
from lrdaccel.planning import plan as make_plan
from lrdaccel.racing.contestants import BuildContext, Built

PRUNE_DEFAULTS: dict[str, Any] = {"params": "lrd", "importance": "magnitude", "lr": 1.0, "kd": 0.0}
LORA_DEFAULTS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "ratio": 2.0, "lr": 10.0, "kd": 0.0}


def check_prune_options(options: dict) -> None:
    """Raises ValueError naming the option and its bad value; ImportError without the extra."""
    require_peers("prune")
    check_choice("importance", options["importance"], ("magnitude", "taylor"))
    if options["params"] != "lrd":
        check_number("params", options["params"], above=0)
        if options["params"] >= 1:
            raise ValueError(f"params must be a fraction of the original's parameters in (0, 1), got "
                             f"{options['params']!r}")


def check_prune_reachable(name: str, options: dict, model: nn.Module, context: BuildContext) -> None:
    """A fraction of the parameters below the fewest pruning can leave is refused before any
    variant is built (MiniLM's embeddings alone are over half of it: params=0.5 cannot be met).

    Raises:
        ValueError: naming the variant, the floor and the fraction that can be asked for.
    """
    if options["params"] == "lrd":
        return
    before = count_params(model)
    floor = pruning_floor(model, context.example_inputs, exclude=list(context.keep) or None)
    tolerance = PruneConfig.tolerance
    if options["params"] * before < floor * (1 - tolerance):
        raise ValueError(f"variant {name!r}: params={options['params']:g} asks for {options['params'] * before:,.0f} "
                         f"of {before:,} parameters, but pruning every group as far as it goes leaves {floor:,} "
                         f"({floor / before:.3f}x; embeddings, the residual stream and the new head are kept): "
                         f"give params >= {floor / before:.3f}")


def check_lora_options(options: dict) -> None:
    require_peers("lora")
    check_int("rank", options["rank"], 1)
    check_number("alpha", options["alpha"], above=0)
    check_ratio(options["ratio"])


def build_prune(options: dict, model: nn.Module, context: BuildContext) -> Built:
    budget = {"params_fraction": options["params"]}
    if options["params"] == "lrd":
        matched = next((m for name, m in context.built.items() if context.kinds.get(name) == "lrd"), None)
        if matched is None:
            raise ValueError("prune(params=lrd) matches the race's first lrd variant: put one before it, "
                             "or give params=<fraction of the original's parameters>")
        budget = {"target_params": sum(p.numel() for p in matched.parameters())}
    loss_fn = None
    if options["importance"] == "taylor":
        loss_fn = labelled_loss(list(zip(context.calibration, context.calibration_labels)))
    pruned, report = prune(model, context.example_inputs, importance=options["importance"], loss_fn=loss_fn,
                           exclude=list(context.keep) or None, **budget)
    return Built(pruned, lr_scale=options["lr"], kd=options["kd"],
                 notes={"pruning_ratio": report.pruning_ratio, "params_after": report.params_after,
                        "heads": {k: list(v) for k, v in report.heads.items()}})


def build_lora(options: dict, model: nn.Module, context: BuildContext) -> Built:
    keep = set(context.keep)
    plan = make_plan(model, ratio=options["ratio"], exclude=lambda _m, name: name in keep)
    tuned, report = lora(model, plan, r=options["rank"], alpha=options["alpha"], trainable=list(keep) or None)
    return Built(tuned, lr_scale=options["lr"], kd=options["kd"], served=merge_lora,
                 notes={"adapted_layers": len(report.targets), "adapter_params": report.adapter_params,
                        "trainable_params": report.trainable_params})
