"""Which contestants a race runs: parsing `--variants`, checking every option before any work,
and building each one.

A variant is written `kind` or `kind(option=value, ...)`, several separated by commas:
`original,lrd,lrd(ratio=1.5,freeze=static)`. Its name in the results is the text as written.
Kinds:

- `original`: the starting classifier as it is, every parameter trained.
- `lrd`: lrdaccel's pipeline (lrdaccel.racing.lrd_variant: its options and defaults).
- `prune`, `lora`: the peers (lrdaccel.racing.peer_variants), with the `peers` extra.

`lr` (a multiplier of the race's learning rate) and `kd` (weight of distillation from the
starting classifier's logits) apply to every kind. `lrd` and `prune` train at the race's rate by
default (`lr=1`), as the original does: a higher rate helped the original as much as LRD in the
benchmarks (BENCHMARKS.md 10b), so a doubled default credited LRD with the learning rate.
`DEFAULT_VARIANTS` races an original at every multiplier its other variants use.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

from lrdaccel._settings import check_number
from lrdaccel.racing.contestants import BuildContext, Built, VariantSpec
from lrdaccel.racing.lrd_variant import LRD_DEFAULTS, build_lrd, check_lrd_options
from lrdaccel.racing.peer_variants import (LORA_DEFAULTS, PRUNE_DEFAULTS, build_lora, build_prune, check_lora_options,
                                           check_prune_options, check_prune_reachable)

SHARED_DEFAULTS: dict[str, Any] = {"lr": 1.0, "kd": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {"original": SHARED_DEFAULTS, "lrd": LRD_DEFAULTS, "prune": PRUNE_DEFAULTS,
                                       "lora": LORA_DEFAULTS}
CHECKS: dict[str, Callable[[dict], None]] = {"lrd": check_lrd_options, "prune": check_prune_options,
                                             "lora": check_lora_options}
BUILDERS: dict[str, Callable[[dict, nn.Module, BuildContext], Built]] = {"lrd": build_lrd, "prune": build_prune,
                                                                         "lora": build_lora}
KINDS = tuple(DEFAULTS)
DEFAULT_VARIANTS = "original,lrd"  # lrd at lr x1: the original at lr x1 is its control


def parse_variants(text: str) -> list[VariantSpec]:
    """`original,lrd(ratio=1.5,freeze=static)` -> specs, checked before any work, the reference
    (`original` as it is) first.

    Raises:
        ValueError: an empty list, no `original`, an unknown kind or option, a bad value, a
            repeated name, or unbalanced parentheses, naming the variant.
    """
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ValueError(f"variants: unbalanced ')' in {text!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"variants: unbalanced '(' in {text!r}")
    items = [item.strip() for item in [*items, current] if item.strip()]
    if not items:
        raise ValueError("variants: give at least one, e.g. original,lrd")
    specs = [parse_variant(item) for item in items]
    names = [spec.name for spec in specs]
    repeated = [name for name in names if names.count(name) > 1]
    if repeated:
        raise ValueError(f"variants: {repeated[0]!r} is given twice")
    specs = reference_first(specs)
    for position, spec in enumerate(specs):
        earlier = {other.kind for other in specs[:position]}
        if spec.kind == "prune" and spec.options["params"] == "lrd" and "lrd" not in earlier:
            raise ValueError(f"variant {spec.name!r} matches the parameters of an lrd variant: put one before it, "
                             f"or give params=<fraction of the original's parameters>")
    return specs


def reference_first(specs: list[VariantSpec]) -> list[VariantSpec]:
    """The reference, `original` as it is, first; other variants of kind original (another
    learning rate, distillation) race like any contestant.

    Raises:
        ValueError: no `original`.
    """
    reference = [spec for spec in specs if spec.name == "original"]
    if not reference:
        raise ValueError("variants: the race is measured against the original: include `original`")
    return reference + [spec for spec in specs if spec.name != "original"]


def parse_variant(item: str) -> VariantSpec:
    """One `kind` or `kind(option=value, ...)`.

    Raises:
        ValueError: as parse_variants.
    """
    match = re.fullmatch(r"\s*([a-z_][a-z0-9_-]*)\s*(?:\((.*)\))?\s*", item, flags=re.S)
    if not match:
        raise ValueError(f"variant {item!r}: expected kind or kind(option=value, ...) with a kind of "
                         f"{', '.join(KINDS)}")
    kind, body = match.group(1), match.group(2)
    if kind not in KINDS:
        raise ValueError(f"unknown variant {kind!r} in {item!r}; known: {', '.join(KINDS)}")
    options = {}
    for part in filter(None, (p.strip() for p in (body or "").split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"variant {item!r}: option {part!r} must be name=value")
        if key.strip() in options:
            raise ValueError(f"variant {item!r}: option {key.strip()!r} is given twice; give it once")
        options[key.strip()] = _value(raw.strip())
    name = item.strip()
    return VariantSpec(name, kind, checked_options(kind, options, name))


def _value(raw: str) -> Any:
    """true/false, a number, a quoted string (taken as it is: regexes keep their backslashes),
    else the text itself (method=whiten)."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    for number in (int, float):
        try:
            return number(raw)
        except ValueError:
            pass
    return raw


def checked_options(kind: str, options: dict, name: str) -> dict:
    """The options with the kind's defaults filled in, each checked.

    Raises:
        ValueError: an option the kind does not take, or a bad value, naming the variant.
    """
    defaults = DEFAULTS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"variant {name!r}: unknown option {unknown[0]!r}; {kind} takes {sorted(defaults)}")
    merged = {**defaults, **options}
    try:
        check_number("lr", merged["lr"], above=0)
        check_number("kd", merged["kd"], at_least=0, at_most=1)
        if kind in CHECKS:
            CHECKS[kind](merged)
    except (ValueError, ImportError) as error:  # a missing extra is the user's to fix: one line, before work
        raise ValueError(f"variant {name!r}: {error}") from None
    return merged


def check_before_building(specs: list[VariantSpec], model: nn.Module, context: BuildContext) -> None:
    """What needs the model itself, checked before any variant is built: a pruning budget the
    model cannot reach.

    Raises:
        ValueError: naming the variant and what it can reach.
    """
    for spec in specs:
        if spec.kind == "prune":
            check_prune_reachable(spec.name, spec.options, model, context)


def build_variant(spec: VariantSpec, model: nn.Module, context: BuildContext) -> Built:
    """Apply `spec` to `model` (a copy of the starting classifier, changed in place)."""
    if spec.kind == "original":
        return Built(model, lr_scale=spec.options["lr"], kd=spec.options["kd"])
    return BUILDERS[spec.kind](spec.options, model, context)
