"""`optimize_ranks`: measure each decomposed layer where it will run, and pick its rank.

Flow: capture every planned layer's real input with one forward of the example inputs; group
layers that are identical for timing (kind, geometry, input shape and memory format, ratio rank)
so each group is searched once; search each group under the settings' runtime with its times
going through the cache and the per-layer time budget (in eager PyTorch, a 1x1 SVD layer's
execution form too, and with `try_branches` a Tucker-2 core's branches: `rankopt.forms`); write
the choice, the three times and the reason into a new plan.

A merged row (`plan(merge=True)`) is searched as one unit: its bottleneck branch run alone
(`BottleneckChain`, on the input of its first conv) against the merged block at each pair of
inner widths; where no width beats the original block, its three convs are kept.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import autocast_dtype, model_device, model_dtype, unwrap
from lrdaccel._settings import parse_device, parse_dtype, resolve
from lrdaccel.factorize.ranks import Rank
from lrdaccel.measure.machine import device_name
from lrdaccel.measure.runtimes import check_runtime
from lrdaccel.layers.registry import dense_shape
from lrdaccel.planning import LayerPlan, Plan
from lrdaccel.rankopt.cache import CacheArg, TimingCache
from lrdaccel.rankopt.capture import InputSpec, capture_inputs
from lrdaccel.rankopt.layer_times import LayerTimes, dtype_name
from lrdaccel.rankopt.layer_timing import BenchmarkTimer, Timer, input_signature, layer_signature
from lrdaccel.planning.forms import FORMS_KEY
from lrdaccel.rankopt.forms import branch_counts, choose_branches, choose_form, linear_form_possible, timing_chain
from lrdaccel.rankopt.search import Choice, SearchSettings, search_rank
from lrdaccel.planning.validation import validate_plan

NOT_REACHED = "not reached by the example inputs; ratio rank kept"


def optimize_ranks(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any,
    objective: str | None = None,
    *,
    settings: SearchSettings | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    cache: CacheArg = None,
    timer: Timer | None = None,
    progress: bool = False,
    **search: Any,
) -> Plan:
    """A new plan whose decomposed layers use the ranks that run best on this device.

    Neither `model` nor `plan` is changed. Every decomposed row of the result carries its
    chosen rank, `time_original_ms`, `time_ratio_rank_ms`, `time_ms` and a reason; a row whose
    best decomposition is not faster than the original layer becomes kind "keep"; a row the
    example inputs never reach keeps its ratio rank and says so.

    Args:
        model: the trained model (wrappers are looked through).
        plan: from `lrd.plan(model, ...)`; decomposed rows start the search at their ratio rank.
        example_inputs: a tensor, tuple or dict for the model, with the batch shape you will run.
        objective: shorthand for the settings' objective, "infer" or "train".
        settings: a SearchSettings; keyword `search` settings (its field names: runtime, rule,
            tradeoff, max_growth, lowest, min_gain, budget_s, min_run_time) override its fields.
            `runtime="compile"` times each candidate compiled (and resets torch._dynamo's
            caches before each, so other compiled models recompile on their next call);
            `runtime="onnxruntime"` times it in ONNX Runtime (CPU, inference only).
        device: where to time (default: the model's); layers are copied there, the model is not.
            A device this machine lacks (device="cuda" without a GPU) fails before any work.
        dtype: precision to time in (torch dtype or name like "bfloat16"; default: the autocast
            dtype where this is called under torch.autocast for that device, as the model will
            run, else the model's). The memory format is the one each layer's input has in the
            model (channels_last model and inputs: channels_last layers).
        cache: None for the default file under the user cache dir, a path, a TimingCache,
            or False for no file (identical layers are still timed once).
        timer: `timer(TimingJob) -> ms`; default BenchmarkTimer(settings.min_run_time).
        progress: show a tqdm bar over the distinct layers.

    Returns:
        The optimized Plan; `plan.meta["rank_optimization"]` records settings (the runtime
        among them), counts, and the execution forms chosen (`lrdaccel.planning.forms.apply_forms`).

    Raises:
        ValueError: a bad objective / runtime / rule / number / dtype, a device the runtime
            cannot time on, or a plan for another model.

    Example:
        >>> import torch, lrdaccel as lrd
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
        >>> p = lrd.optimize_ranks(model, lrd.plan(model, 2.0), torch.randn(64, 256), cache=False, budget_s=1)
        >>> sorted(p.meta["rank_optimization"])[:3]
        ['budget_s', 'cache_hits', 'device']
    """
    start = time.perf_counter()
    if device is not None:
        device = parse_device(device)  # before any work
    if objective is not None:
        search["objective"] = objective
    settings = resolve(SearchSettings, settings, search, "optimize_ranks")
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an lrdaccel Plan (from lrd.plan), got {type(plan).__name__}")
    model = unwrap(model)
    validate_plan(model, plan)
    device = model_device(model) if device is None else device
    check_runtime(settings.runtime, settings.objective, device)
    if dtype is None:
        dtype = autocast_dtype(device) or model_dtype(model)
    dtype = parse_dtype(dtype)
    timer = timer or BenchmarkTimer(settings.min_run_time)
    timings = _Timings(TimingCache.from_arg(cache), timer, device, dtype, settings)

    rows = plan.decomposed + plan.merged
    entry = {row.name: row.merge.first if row.kind == "merged" else row.name for row in rows}
    inputs = capture_inputs(model, list(entry.values()), example_inputs)
    captured = {row.name: inputs[entry[row.name]] for row in rows if entry[row.name] in inputs}
    sensitivity = plan.meta.get("sensitivity") or {}
    groups: dict[tuple, list[LayerPlan]] = {}
    for row in rows:
        if row.name in captured:
            # Layers with their own sensitivity choose alone (their times still come from the cache).
            key = _group_key(model, row, captured[row.name]) + ((row.name,) if row.name in sensitivity else ())
            groups.setdefault(key, []).append(row)

    new_rows = {row.name: row.with_rank(_ratio_rank(row), NOT_REACHED) for row in rows if row.name not in captured}
    forms = {}
    bar = tqdm(groups.values(), desc="timing layers", unit="layer", disable=not progress)
    for group in bar:
        first = group[0]
        bar.set_postfix_str(first.name, refresh=False)
        choice = timings.search(_timed_module(model, first), first, captured[first.name], plan.beta,
                                sensitivity.get(first.name))
        for row in group:
            new_rows.update({new.name: new for new in _apply(model, row, choice)})
            if choice.form is not None:
                forms[row.name] = choice.form
        timings.cache.save()

    meta = dict(plan.meta)
    meta["rank_optimization"] = {
        **dataclasses.asdict(settings),
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "distinct_layers": len(groups),
        "timed": timings.timed,
        "cache_hits": timings.hits,
        "seconds": round(time.perf_counter() - start, 3),
        FORMS_KEY: forms,
    }
    layers = {row.name: row for row in plan} | new_rows
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return Plan(sorted(layers.values(), key=lambda row: order[row.name]), ratio=plan.ratio, beta=plan.beta, meta=meta)


class _Timings:
    """Per-layer searches of one run, sharing the cache and timer, each within the time budget."""

    def __init__(self, cache: TimingCache, timer: Timer, device: torch.device, dtype: torch.dtype,
                 settings: SearchSettings):
        self.cache, self.timer, self.objective = cache, timer, settings.objective
        self.device, self.dtype, self.settings = device, dtype, settings
        self.timed = self.hits = 0

    def search(self, dense: nn.Module, row: LayerPlan, spec: InputSpec, beta: float,
               sensitivity: dict | None = None) -> Choice:
        times = LayerTimes(dense, row.kind, spec, self.objective, self.device, self.dtype, self.cache, self.timer,
                           self.settings.runtime, self.settings.compile_mode)
        spent = 0.0  # charged with the recorded cost of cached times too, so reruns stop where the first did

        def measure(rank: Rank, required: bool = False) -> float | None:
            nonlocal spent
            budget = self.settings.budget_s
            if not required and budget is not None and spent >= budget:
                return None
            entry = times(rank)
            spent += entry.cost_s
            return entry.ms

        try:
            choice = search_rank(row, measure, self.settings, beta, sensitivity)
            if (self.settings.runtime == "eager" and choice.rank is not None
                    and linear_form_possible(dense, row.kind, choice.rank)):
                choice = choose_form(choice, lambda rank, form: times(rank, form).ms, self.settings.min_gain)
            if self.settings.try_branches > 1 and choice.rank is not None and row.kind == "tucker2":
                choice = choose_branches(choice, row, beta, branch_counts(self.settings.try_branches),
                                         lambda rank, n: times(rank, branches=n).ms, self.settings.min_gain)
            return choice
        finally:
            self.timed += times.timed
            self.hits += times.hits


def _timed_module(model: nn.Module, row: LayerPlan) -> nn.Module:
    """What a row's times are of: the layer, or a merged row's bottleneck branch run alone."""
    return timing_chain(model, row) if row.kind == "merged" else model.get_submodule(row.name)


def _apply(model: nn.Module, row: LayerPlan, choice: Choice) -> list[LayerPlan]:
    """The row (or, for a merged block kept as it was, its three convs' rows) as chosen."""
    if choice.rank is None and row.kind == "merged":
        return [_kept(model, name, f"kept with its block ({row.name}): {choice.reason}")
                for name in (row.merge.first, row.merge.last)] + [_timed(row.with_rank(None, choice.reason,
                                                                                         kind="keep"), choice)]
    if choice.rank is None:
        new = row.with_rank(None, choice.reason, kind="keep")
    elif choice.branches > 1:
        new = row.with_rank(choice.rank, choice.reason, kind="tucker2_branched", branches=choice.branches)
    else:
        new = row.with_rank(choice.rank, choice.reason)
    return [_timed(new, choice)]


def _timed(row: LayerPlan, choice: Choice) -> LayerPlan:
    return dataclasses.replace(row, time_original_ms=choice.time_original_ms,
                               time_ratio_rank_ms=choice.time_ratio_rank_ms, time_ms=choice.time_ms)


def _kept(model: nn.Module, name: str, reason: str) -> LayerPlan:
    conv = model.get_submodule(name)
    return LayerPlan(name, "keep", None, reason, type(conv).__name__, dense_shape(conv), tuple(conv.stride))


def _ratio_rank(row: LayerPlan) -> Rank:
    return row.ratio_rank if row.ratio_rank is not None else row.rank


def _group_key(model: nn.Module, row: LayerPlan, spec: InputSpec) -> tuple:
    return row.kind, layer_signature(_timed_module(model, row)), input_signature(spec), _ratio_rank(row)


def timing_table(plan: Plan) -> str:
    """The decomposed and re-kept rows of an optimized plan with their three times, as text."""
    header = ("layer", "ratio rank", "chosen", "original ms", "ratio ms", "chosen ms")
    lines = []
    for row in plan:
        if row.time_original_ms is None and row.reason != NOT_REACHED:
            continue
        chosen = "original" if row.kind == "keep" else _short(row.rank)
        lines.append((row.name, _short(row.ratio_rank), chosen, _ms(row.time_original_ms),
                      _ms(row.time_ratio_rank_ms), _ms(row.time_ms)))
    if not lines:
        return "no timed layers"
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


def _short(rank: Rank) -> str:
    return "-" if rank is None else (str(rank) if isinstance(rank, int) else "{}x{}".format(*rank))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
