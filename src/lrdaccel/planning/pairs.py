"""The record a "narrow" plan row keeps of its consumer, and the row's counts.

A narrow row is named by the producer (the layer whose outputs shrink); its rank is the kept
width k. The consumer (the layer that reads that width through an elementwise activation) gets no
row of its own: `NarrowPair` names it with its geometry before narrowing, so that the plan alone
rebuilds the narrowed shapes on an unchanged model (lrd.load) and checks they fit. The kept
channels' indices are not stored: the narrowed weights carry them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NarrowPair:
    """The consumer of a narrowed width, by qualified module name.

    Attributes:
        consumer: the layer that reads the width (its inputs shrink to the kept channels).
        consumer_type: its class name before narrowing (Linear, Conv1D, Conv2d).
        consumer_shape: its {"out", "in", "kernel"} before narrowing.
        resized: the modules between them cut to the kept channels, in execution order:
            BatchNorm2d and depthwise Conv2d (an MBConv's expanded channels pass one).
        depthwise_area: the kernel area of those depthwise convs, summed (for the counts).
        co_producers: layers cut to the same kept width beside the producer (an attention's query
            and key, the producer being its value); co_producer_inputs: their input widths, summed.
        heads: for attention, the number of heads (the width is heads x the kept head size), else 0.
        attention: for attention, the module whose head size attribute shrinks, else "".
    """

    consumer: str
    consumer_type: str
    consumer_shape: dict
    resized: tuple[str, ...] = ()
    depthwise_area: int = 0
    co_producers: tuple[str, ...] = ()
    co_producer_inputs: int = 0
    heads: int = 0
    attention: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "resized", tuple(self.resized))
        object.__setattr__(self, "co_producers", tuple(self.co_producers))

    def module_names(self) -> list[str]:
        """Every module the narrowing replaces besides the row's own producer."""
        return [self.consumer, *self.resized, *self.co_producers]


def narrow_cost(shape: dict, pair: NarrowPair, width: int | None) -> tuple[int, int, int, int]:
    """(params_before, macs_before, params_after, macs_after) of producer and consumer together:
    weights (biases excluded) and MACs per position (both layers run at the same positions)."""
    producer_area, consumer_area = math.prod(shape["kernel"]), math.prod(pair.consumer_shape["kernel"])
    per_channel = shape["in"] * producer_area + pair.consumer_shape["out"] * consumer_area + pair.depthwise_area
    per_channel += pair.co_producer_inputs
    before = shape["out"] * per_channel
    after = before if width is None else width * per_channel
    return before, before, after, after
