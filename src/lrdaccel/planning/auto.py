"""`form="auto"`: per narrowable width and per factorizable layer, keep, factor or narrow.

The planner hands over both plans at the same ratio: the factor plan's rows (SVD / Tucker-2 at the
ratio rank, or kept with their reason) and the narrow plan's rows (a "narrow" row per width that
can narrow). Each unit is decided once, so no layer gets two rows:
- a narrowable pair (producer, its co-producers for attention, consumer): narrow the pair, factor
  its layers as the factor plan has them, or keep them all;
- every other layer the factor plan decomposes: factor it or keep it.

By the rule rank optimization uses (`rankopt.search`, rule "tradeoff"), each option is scored
against the unit as it is:

    score = (t_keep - t) / t_keep  -  tradeoff * error

with t the unit's time on this runtime and `error` its relative output error on the calibration
batches (what the unit loses; 0 for keep), both measured by `planning.auto_measure`. The best
option is taken if its score beats keeping by more than `min_gain` (timing noise); otherwise the
unit is kept. Each row's reason states the measured times, errors and scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.planning.auto_measure import (
    BenchmarkLayerTimer, LayerTimer, UnitTimes, combined, factorized, head_error, input_shapes, narrow_error,
    narrowed_shape, resized)
from lrdaccel.planning.rows import LayerPlan
from lrdaccel.planning.sensitivity import truncation_loss

MIN_GAIN = 0.02  # as rank optimization's default: a score within this of keeping is noise


@dataclasses.dataclass
class _Option:
    form: str
    ms: float
    error: float
    score: float = 0.0


def choose_forms(model: nn.Module, factor_rows: list[LayerPlan], narrow_rows: list[LayerPlan], example_inputs: Any,
                 calibration: Any, *, tradeoff: float = 1.0,
                 timer: LayerTimer | None = None) -> tuple[list[LayerPlan], dict]:
    """The rows of the mixed plan, and the record of every decision (for `plan.meta["auto_form"]`).

    Raises:
        ValueError: a calibration batch the model fails on, or a layer to decide that the
            calibration never reaches; a timer that gives no positive time.
    """
    factor = {row.name: row for row in factor_rows}
    pairs = [row for row in narrow_rows if row.kind == "narrow"]
    in_pairs = {name for row in pairs for name in (row.name, *row.narrow.module_names())}
    singles = [row.name for row in factor_rows if row.decomposed and row.name not in in_pairs]
    unit_names = {row.name: [row.name, *row.narrow.co_producers, row.narrow.consumer] for row in pairs}
    unit_names.update({name: [name] for name in singles})

    decomposed = [name for names in unit_names.values() for name in names if factor[name].decomposed]
    observed = [row.name if row.narrow.heads else row.narrow.consumer for row in pairs]
    wanted = list(dict.fromkeys(decomposed + observed))
    stats = collect_input_stats(model, wanted, calibration) if wanted else {}  # one pass for every error
    unreached = next((name for name in wanted if not stats[name].count), None)
    if unreached is not None:
        raise ValueError(f"form='auto': no calibration batch reaches {unreached!r}; exclude it or give batches "
                         f"that use it")
    shapes = input_shapes(model, [name for names in unit_names.values() for name in names], example_inputs)
    times = UnitTimes(timer or BenchmarkLayerTimer())

    def factor_error(name: str) -> float:
        row = factor[name]
        if not row.decomposed:
            return 0.0
        loss = truncation_loss(model.get_submodule(name), stats[name].covariance())
        lost, energy = (loss[row.rank], loss[0]) if isinstance(row.rank, int) else (loss[row.rank[1], row.rank[0]],
                                                                                    loss[0, 0])
        return float(lost / energy) ** 0.5 if energy > 0 else 0.0

    rows = dict(factor)
    record = {}
    not_narrowed = {row.name: row.reason for row in narrow_rows
                    if row.kind == "keep" and row.reason.startswith("not narrowed")}
    for name, names in unit_names.items():
        if any(n not in shapes for n in names):  # nothing to time: the factor plan's rows stay
            rows.update({n: dataclasses.replace(factor[n], reason=f"{factor[n].reason}; auto: not reached by the "
                                                                  f"example inputs, not decided") for n in names})
            continue
        modules = {n: model.get_submodule(n) for n in names}
        keep_ms = times([(modules[n], shapes[n]) for n in names])
        options = [_Option("keep", keep_ms, 0.0)]
        if any(factor[n].decomposed for n in names):
            options.append(_Option("factor", times([(factorized(modules[n], factor[n]), shapes[n]) for n in names]),
                                   combined(factor_error(n) for n in names)))
        pair = next((row for row in pairs if row.name == name), None)
        if pair is not None:
            options.append(_Option("narrow", times(_narrowed(modules, pair, shapes)),
                                   _pair_error(model, pair, stats)))
        for option in options:
            option.score = (keep_ms - option.ms) / keep_ms - tradeoff * option.error
        best = max(options, key=lambda o: o.score)
        if best.score <= MIN_GAIN:
            best = options[0]
        why = _reason(best, options)
        record[name] = {"form": best.form, "layers": names,
                        **{f"{o.form}_{what}": round(getattr(o, what), 6) for o in options for what in ("ms", "error")}}
        if best.form == "narrow":
            rows[name] = dataclasses.replace(pair, reason=f"{pair.reason}; {why}")
            for other in pair.narrow.module_names():
                rows.pop(other, None)
            continue
        extra = f" ({not_narrowed[name]})" if name in not_narrowed else ""
        for n in names:
            row = factor[n]
            text = why + extra if n == name else f"auto: {best.form}, with the pair of {name}"
            if best.form == "keep" and row.decomposed:
                rows[n] = row.with_rank(None, f"{row.reason}; {text}", kind="keep")
            else:
                rows[n] = dataclasses.replace(row, reason=f"{row.reason}; {text}")
    return list(rows.values()), {"tradeoff": tradeoff, "min_gain": MIN_GAIN, "timed": times.timed, "units": record}


def _narrowed(modules: dict[str, nn.Module], pair: LayerPlan, shapes: dict[str, tuple]) -> list[tuple]:
    """(module, input shape) of each layer of a pair narrowed to the row's width."""
    width, consumer = pair.rank, pair.narrow.consumer
    built = [(resized(modules[n], out=width), shapes[n]) for n in (pair.name, *pair.narrow.co_producers)]
    read = narrowed_shape(modules[consumer], shapes[consumer], width)
    return built + [(resized(modules[consumer], into=width), read)]


def _pair_error(model: nn.Module, pair: LayerPlan, stats: dict) -> float:
    narrow = pair.narrow
    if narrow.heads:
        query, key = (model.get_submodule(n) for n in narrow.co_producers)
        return head_error(query, key, model.get_submodule(pair.name), model.get_submodule(narrow.consumer),
                          stats[pair.name], narrow.heads, pair.rank // narrow.heads)
    return narrow_error(model.get_submodule(narrow.consumer), stats[narrow.consumer], pair.rank)


def _reason(best: _Option, options: list[_Option]) -> str:
    keep = options[0]
    parts = [f"keep {keep.ms:.3f} ms"] + [f"{o.form} {o.ms:.3f} ms, error {o.error:.3f}, score {o.score:+.3f}"
                                          for o in options[1:]]
    return f"auto: {best.form} ({'; '.join(parts)})"
