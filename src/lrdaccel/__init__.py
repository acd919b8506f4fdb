"""lrdaccel: faster fine-tuning and serving of trained PyTorch models by low-rank decomposition.

    import lrdaccel as lrd
    plan = lrd.plan(model, ratio=2.0)
    plan = lrd.optimize_ranks(model, plan, example_inputs)
    report = lrd.decompose(model, plan)
    freezer = lrd.SequentialFreezer(model)
    lrd.save(model, "out/")
    model = lrd.load("out/", base_model)
"""

from lrdaccel._version import __version__
from lrdaccel.deploy import ExportConfig, ExportReport, FuseReport, export_onnx, fuse_batchnorm, quantize
from lrdaccel.io import load, save
from lrdaccel.layers import BranchedTuckerConv2d, LowRankModule, MergedConv2d, SVDConv2d, SVDLinear, TuckerConv2d
from lrdaccel.planning import LayerPlan, Plan, PlanConfig, allocate_ranks, find_merge_candidates, plan
from lrdaccel.planning.narrow import find_narrow_candidates
from lrdaccel.racing import RaceConfig, race
from lrdaccel.rankopt import SearchSettings, optimize_ranks
from lrdaccel.calibration import BatchNormReport, recalibrate_batchnorm
from lrdaccel.decomposition import DecomposeConfig, DecomposeReport, LayerReport, decompose
from lrdaccel.training import DistillConfig, FinetuneConfig, History, SequentialFreezer, distill, finetune

__all__ = [
    "BatchNormReport",
    "BranchedTuckerConv2d",
    "DecomposeConfig",
    "DecomposeReport",
    "DistillConfig",
    "ExportConfig",
    "ExportReport",
    "FinetuneConfig",
    "FuseReport",
    "History",
    "LayerPlan",
    "LayerReport",
    "LowRankModule",
    "MergedConv2d",
    "Plan",
    "PlanConfig",
    "RaceConfig",
    "SVDConv2d",
    "SVDLinear",
    "SearchSettings",
    "SequentialFreezer",
    "TuckerConv2d",
    "allocate_ranks",
    "decompose",
    "distill",
    "export_onnx",
    "find_merge_candidates",
    "find_narrow_candidates",
    "finetune",
    "fuse_batchnorm",
    "load",
    "optimize_ranks",
    "plan",
    "quantize",
    "race",
    "recalibrate_batchnorm",
    "save",
    "__version__",
]
