"""Rank optimization: time decomposed layers on the target device and keep the ranks that pay.

    import lrdaccel as lrd
    from lrdaccel.rankopt import compare_end_to_end
    plan = lrd.plan(model, ratio=2.0)
    fast = lrd.optimize_ranks(model, plan, example_inputs, objective="infer")
    print(compare_end_to_end(model, {"ratio ranks": plan, "optimized": fast}, example_inputs))

Modules: capture (each layer's real input), layer_timing (one layer alone, on the measure core),
layer_times + cache (times keyed by device/runtime/shape/rank, persisted as JSON), search
(candidates and the scoring rules), forms (a layer's execution form: chosen, recorded, applied),
choose (`optimize_ranks`, the public verb), whole_model (whole-model check), staircase (time
against rank, and its plot). Every time is taken in the runtime the model will run in
(`runtime="eager" | "compile" | "onnxruntime"`).
"""

from lrdaccel.rankopt.cache import TimingCache, default_cache_path
from lrdaccel.rankopt.capture import InputSpec, capture_inputs
from lrdaccel.rankopt.choose import optimize_ranks, timing_table
from lrdaccel.planning.forms import apply_forms
from lrdaccel.rankopt.layer_timing import BenchmarkTimer, TimingJob
from lrdaccel.rankopt.search import SearchSettings
from lrdaccel.rankopt.staircase import Staircase, measure_staircase, plot_staircase
from lrdaccel.rankopt.whole_model import EndToEndReport, compare_end_to_end

__all__ = [
    "BenchmarkTimer",
    "EndToEndReport",
    "InputSpec",
    "SearchSettings",
    "Staircase",
    "TimingCache",
    "TimingJob",
    "apply_forms",
    "capture_inputs",
    "compare_end_to_end",
    "default_cache_path",
    "measure_staircase",
    "optimize_ranks",
    "plot_staircase",
    "timing_table",
]
