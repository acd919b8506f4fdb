"""lrdaccel: faster fine-tuning and serving of trained PyTorch models by low-rank decomposition.

    import lrdaccel as lrd
    plan = lrd.plan(model, ratio=2.0)
    plan = lrd.optimize_ranks(model, plan, example_inputs)
    report = lrd.decompose(model, plan)
    freezer = lrd.SequentialFreezer(model)
    lrd.save(model, "out/")
    model = lrd.load("out/", base_model)
"""

__version__ = "0.1.0"

from lrdaccel.freezing import SequentialFreezer
from lrdaccel.io import load, save
from lrdaccel.layers import LowRankModule, SVDConv2d, SVDLinear, TuckerConv2d
from lrdaccel.plan import LayerPlan, Plan, plan
from lrdaccel.rankopt import optimize_ranks
from lrdaccel.surgery import DecomposeReport, LayerReport, decompose
from lrdaccel.train import FinetuneConfig, History, finetune

__all__ = [
    "DecomposeReport",
    "FinetuneConfig",
    "History",
    "LayerPlan",
    "LayerReport",
    "LowRankModule",
    "Plan",
    "SVDConv2d",
    "SequentialFreezer",
    "SVDLinear",
    "TuckerConv2d",
    "__version__",
    "decompose",
    "finetune",
    "load",
    "optimize_ranks",
    "plan",
    "save",
]
