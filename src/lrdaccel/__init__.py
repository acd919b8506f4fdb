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
from lrdaccel.deploy import ExportConfig, ExportReport, FuseReport, export_onnx, fuse_batchnorm
from lrdaccel.io import load, save
from lrdaccel.layers import LowRankModule, SVDConv2d, SVDLinear, TuckerConv2d
from lrdaccel.planning import LayerPlan, Plan, PlanConfig, plan
from lrdaccel.rankopt import SearchSettings, optimize_ranks
from lrdaccel.surgery import DecomposeConfig, DecomposeReport, LayerReport, decompose
from lrdaccel.training import FinetuneConfig, History, SequentialFreezer, finetune

__all__ = [
    "DecomposeConfig",
    "DecomposeReport",
    "ExportConfig",
    "ExportReport",
    "FinetuneConfig",
    "FuseReport",
    "History",
    "LayerPlan",
    "LayerReport",
    "LowRankModule",
    "Plan",
    "PlanConfig",
    "SVDConv2d",
    "SVDLinear",
    "SearchSettings",
    "SequentialFreezer",
    "TuckerConv2d",
    "__version__",
    "decompose",
    "export_onnx",
    "finetune",
    "fuse_batchnorm",
    "load",
    "optimize_ranks",
    "plan",
    "save",
]
