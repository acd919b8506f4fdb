"""Decomposed layers, each built from a dense layer: `from_dense`, `.factors`, `to_dense()`."""

from lrdaccel.layers.base import LowRankModule
from lrdaccel.layers.branched import BranchedTuckerConv2d
from lrdaccel.layers.merged import MergedConv2d
from lrdaccel.layers.registry import REGISTRY, SUPPORTED, entry_for, layer_class_for
from lrdaccel.layers.svd import SVDConv2d, SVDLinear
from lrdaccel.layers.tucker import TuckerConv2d

__all__ = ["REGISTRY", "SUPPORTED", "BranchedTuckerConv2d", "LowRankModule", "MergedConv2d", "SVDConv2d", "SVDLinear",
           "TuckerConv2d", "entry_for", "layer_class_for"]
