"""LoRA (PEFT) on the layers LRD decomposes: the fine-tuning peer of sequential freezing.

    from lrdaccel import peers
    plan = lrd.plan(model, ratio=2.0)
    tuned, report = peers.lora(model, plan, r=8, trainable=["classifier"])
    ...                                   # train: only adapters and the classifier move
    served = peers.merge_lora(tuned)      # the original architecture, adapters folded in

Targets are the layers an LRD plan decomposes, where PEFT can adapt them: nn.Linear, Hugging
Face Conv1D and ungrouped nn.Conv2d (or names given outright), so LoRA and LRD change the same
layers. Modules in `trainable` (a new
classification head) are left trainable with plain requires_grad rather than PEFT's
`modules_to_save`, which would train a copy of the head beside a frozen original, rename its
state-dict keys, and cannot reach a head outside the wrapped model. `lora` returns a copy: the
model passed in is not changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lrdaccel._modules import unwrap
from lrdaccel._settings import check_int, check_number, resolve
from lrdaccel.measure.counting import count_params
from lrdaccel.peers._extra import require_peers
from lrdaccel.planning import Plan
from lrdaccel.planning.targeting import compile_selector

BASE_FLAGS = "lrdaccel_base_requires_grad"  # attribute on the LoRA model: its base's requires_grad by name


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's shape. Attributes: r (adapter rank), alpha (the update is scaled by alpha / r),
    dropout (on the adapter's input; 0 so that a step is deterministic and comparable)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("r", self.r, 1)
        check_number("alpha", self.alpha, above=0)
        check_number("dropout", self.dropout, at_least=0)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class LoraReport:
    """What `lora` did. Counts are parameters: adapters (lora_A + lora_B), everything that
    trains (adapters + the `trainable` modules), and the whole LoRA model."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float
    trainable_modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    adapter_params: int = 0
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        lines = [f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} on {len(self.targets)} layers: "
                 f"{self.trainable_params:,} of {self.total_params:,} parameters train "
                 f"({self.adapter_params:,} in adapters)"]
        if self.trainable_modules:
            lines.append(f"  trained in full: {', '.join(self.trainable_modules)}")
        lines += [f"  not adapted {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def lora_targets(model: nn.Module, targets: Any) -> list[str]:
    """Names of the nn.Linear / Conv1D / Conv2d layers to adapt.

    `targets` is an lrd Plan (its decomposed rows on such layers), a regex, a list of names
    or dotted suffixes, or a callable (module, name) -> bool, as lrd.plan's include takes.

    Raises:
        ValueError: a pattern matching no adaptable layer, a plan naming a layer the model does
            not have, or no target at all.
    """
    modules = dict(model.named_modules())
    candidates = [name for name, module in modules.items() if name and _adaptable(module)]
    if isinstance(targets, Plan):
        rows = [row.name for row in targets.layers if row.kind != "keep"]
        missing = [name for name in rows if name not in modules]
        if missing:
            raise ValueError(f"the plan names layers this model does not have: {missing[:5]}")
        chosen = [name for name in rows if _adaptable(modules[name])]
    else:
        select = compile_selector(targets, "targets", candidates)
        if select is None:
            raise ValueError("lora needs targets: an lrd Plan, layer names, a regex or a callable")
        chosen = [name for name in candidates if select(modules[name], name)]
    if not chosen:
        raise ValueError(f"no nn.Linear / Conv1D / Conv2d (groups=1) layer to adapt among the targets {targets!r}")
    return chosen


def lora(model: nn.Module, targets: Any, config: LoraSettings | None = None, *, trainable: Any = None,
         **overrides) -> tuple[nn.Module, LoraReport]:
    """A copy of `model` with LoRA adapters on `targets`; only adapters (and `trainable`) train.

    Args:
        model: the model (not changed).
        targets: an lrd Plan, names, a regex or a callable (see `lora_targets`).
        config: LoraSettings; its fields (r, alpha, dropout) may be given as keywords instead.
        trainable: modules that stay trainable in full (a new head): names or dotted suffixes,
            a regex or a callable, as lrd.plan's include takes. Targets inside them are not adapted.

    Returns:
        (the PEFT model, LoraReport). Every base weight has requires_grad False but those of
        `trainable`; `merge_lora` gives back the original architecture.

    Raises:
        ImportError: PEFT is missing (before any work).
        ValueError: bad settings or targets, naming the value; the model is unchanged.
    """
    settings = resolve(LoraSettings, config, overrides, "lora")
    peft = require_peers("lora")
    model = unwrap(model)
    names = lora_targets(model, targets)
    keep = _trainable_names(model, trainable)
    skipped = {name: "inside a trainable module (trained in full)" for name in names if _inside(name, keep)}
    names = [name for name in names if name not in skipped]
    if not names:
        raise ValueError("every LoRA target lies inside a trainable module; nothing to adapt")
    conv1d = {_is_conv1d(model.get_submodule(name)) for name in names}
    if len(conv1d) > 1:
        raise ValueError("LoRA targets mix nn.Linear and Conv1D layers; PEFT takes one fan_in_fan_out per "
                         "config: adapt one kind per call")
    base = copy.deepcopy(model)
    flags = {name: parameter.requires_grad for name, parameter in base.named_parameters()}
    peft_config = peft.LoraConfig(target_modules=names, r=settings.r, lora_alpha=settings.alpha,
                                  lora_dropout=settings.dropout, bias="none", fan_in_fan_out=conv1d == {True})
    tuned = peft.get_peft_model(base, peft_config)
    for name, module in base.named_modules():
        if name in keep:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(True)
    setattr(tuned, BASE_FLAGS, flags)
    adapters = sum(p.numel() for n, p in tuned.named_parameters() if ".lora_" in n)
    return tuned, LoraReport(
        targets=names, r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
        trainable_modules=sorted(name for name in keep if not _inside(name, keep - {name})), skipped=skipped,
        adapter_params=adapters, trainable_params=count_params(tuned, trainable_only=True),
        total_params=count_params(tuned))


def merge_lora(tuned: nn.Module) -> nn.Module:
    """A copy of the LoRA model with every adapter folded into its layer (PEFT's merge_and_unload):
    the original architecture and state-dict names, requires_grad as the original model had them.
    The LoRA model itself is not changed (it can keep training).

    Raises:
        ValueError: `tuned` is not a model `lora` returned.
    """
    if not hasattr(tuned, "merge_and_unload") or not hasattr(tuned, BASE_FLAGS):
        raise ValueError(f"merge_lora takes a model returned by lrdaccel.peers.lora, got {type(tuned).__name__}")
    merged = copy.deepcopy(tuned).merge_and_unload()
    flags = getattr(tuned, BASE_FLAGS)
    for name, parameter in merged.named_parameters():
        parameter.requires_grad_(flags.get(name, True))
    return merged


def _trainable_names(model: nn.Module, trainable: Any) -> set[str]:
    names = [name for name, _ in model.named_modules() if name]
    select = compile_selector(trainable, "trainable", names)
    if select is None:
        return set()
    chosen = {name for name, module in model.named_modules() if name and select(module, name)}
    return {name for name in names if _inside(name, chosen)}


def _inside(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2), known by its class name so transformers stays optional."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def _adaptable(module: nn.Module) -> bool:
    """Layers PEFT's LoRA adapts: Linear, Conv1D, and ungrouped Conv2d (adapter: a kxk conv to r
    channels with the layer's stride and padding, then a 1x1 conv back)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or (isinstance(module, nn.Conv2d) and module.groups == 1)
