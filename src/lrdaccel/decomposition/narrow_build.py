"""Building narrowed layers: the producer becomes an ordinary layer with k outputs, the consumer an
ordinary layer with k inputs, refitted (the math is lrdaccel.factorize.narrow).

Rows are applied in sequence (lrdaccel.decomposition.narrow_apply), each on the partly narrowed
model: the consumer's inputs (the
activations after the producer) are gathered on the calibration batches with every earlier width
already narrowed, the k channels kept are chosen on them, the producer keeps its rows of those
channels (exact: selection commutes with the elementwise activation) and the consumer is refitted
by ridge least squares to what the original consumer gives on those same inputs. So each refit
sees the inputs it will get when serving, as the sequential whitened factorization does.

A narrowed layer is a plain layer of its own class with fewer channels (`nn.Linear`, HF Conv1D,
`nn.Conv2d`); a BatchNorm between two convs keeps its kept channels' parameters and
statistics (exact), and `decompose` then re-estimates every BatchNorm's statistics. The producer
carries its plan row as the attribute `lrd_narrow`, so that `lrd.save` writes the
row (`narrowed_rows`) and `lrd.load` rebuilds the shapes from the plan (`narrowed_like`). An HF
config whose FFN width all narrow rows shrink alike gets the new width (`narrow_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lrdaccel.calibration.statistics import InputStats
from lrdaccel.factorize.heads import joint_query_key, joint_value_output
from lrdaccel.factorize.narrow import refit_consumer, relative_output_error, select_channels
from lrdaccel.planning.narrow_heads import head_size_attribute
from lrdaccel.layers.svd import dense_linear_weight, is_conv1d
from lrdaccel.planning.rows import LayerPlan, Plan

MARK = "lrd_narrow"
# HF config fields that hold the FFN width, with the field counting the layers that have one.
CONFIG_WIDTHS = (("intermediate_size", "num_hidden_layers"), ("n_inner", "n_layer"))


def narrowed_like(model: nn.Module, row: LayerPlan) -> dict[str, nn.Module]:
    """{producer: a layer with `row.rank` outputs, consumer: one with `row.rank` inputs, and each
    BatchNorm2d / depthwise conv in between over `row.rank` channels}, default-initialised on the
    originals' device and dtype
    (for loading weights into, or filling). Each keeps its class (Linear, HF Conv1D, Conv2d)."""
    pair, width = row.narrow, row.rank
    producer, consumer = model.get_submodule(row.name), model.get_submodule(pair.consumer)
    built = {row.name: _resized(producer, out=width), pair.consumer: _resized(consumer, into=width)}
    built.update({name: _resized(model.get_submodule(name), out=width) for name in pair.co_producers})
    for name in pair.resized:
        module = model.get_submodule(name)
        if isinstance(module, nn.BatchNorm2d):
            built[name] = nn.BatchNorm2d(width, module.eps, module.momentum, device=module.weight.device,
                                         dtype=module.weight.dtype)
        else:
            built[name] = nn.Conv2d(width, width, module.kernel_size, module.stride, module.padding, module.dilation,
                                    width, module.bias is not None, module.padding_mode, device=module.weight.device,
                                    dtype=module.weight.dtype)
    for name, module in built.items():  # new modules start in training mode: take the originals' flag
        module.train(model.get_submodule(name).training)
    setattr(built[row.name], MARK, dataclasses.replace(row, reason="saved"))
    return built


def _resized(like: nn.Module, out: int | None = None, into: int | None = None) -> nn.Module:
    weight, bias = like.weight, like.bias is not None
    if isinstance(like, nn.Conv2d):
        return nn.Conv2d(into or like.in_channels, out or like.out_channels, like.kernel_size, like.stride,
                         like.padding, like.dilation, 1, bias, like.padding_mode, device=weight.device,
                         dtype=weight.dtype)
    out_features, in_features = dense_linear_weight(like).shape
    if is_conv1d(like):  # stays an HF Conv1D, so that the weights keep HF's layout (from_pretrained)
        base = next(cls for cls in type(like).__mro__ if cls.__name__ == "Conv1D")  # its (nf, nx) signature
        return base(out or out_features, into or in_features).to(device=weight.device, dtype=weight.dtype)
    return nn.Linear(into or in_features, out or out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def _weight(module: nn.Module) -> torch.Tensor:
    """[out, in, *kernel] of a Linear, Conv1D or Conv2d."""
    return module.weight if isinstance(module, nn.Conv2d) else dense_linear_weight(module)


@torch.no_grad()
def fill_narrowed(model: nn.Module, row: LayerPlan, stats: InputStats, selection: str) -> tuple[dict, float]:
    """The row's new layers filled from the model's current ones (untouched) and the consumer's
    input statistics; with the relative error of the consumer's output on those inputs."""
    pair = row.narrow
    producer, consumer = model.get_submodule(row.name), model.get_submodule(pair.consumer)
    consumer_weight = _weight(consumer).detach().double()
    consumer_bias = None if consumer.bias is None else consumer.bias.detach().double()
    gram = stats.covariance()
    if consumer_bias is not None:  # the constant channel: the bias absorbs the dropped channels' means
        mean = stats.mean()
        gram = torch.cat([torch.cat([gram, mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
    readout = consumer_weight.movedim(1, -1).reshape(-1, consumer_weight.shape[1])  # taps as outputs
    kept = select_channels(gram, row.rank, selection, weight=readout, constant=consumer_bias is not None)
    new_weight, new_bias = refit_consumer(consumer_weight, consumer_bias, gram, kept)
    error = relative_output_error(consumer_weight, consumer_bias, gram, kept, new_weight, new_bias)
    built = narrowed_like(model, row)
    index = torch.as_tensor(kept, device=producer.weight.device)
    new_producer, new_consumer = built[row.name], built[pair.consumer]
    _weight(new_producer).copy_(_weight(producer).detach()[index])
    if producer.bias is not None:
        new_producer.bias.copy_(producer.bias.detach()[index])
    _weight(new_consumer).copy_(new_weight.to(new_consumer.weight))
    if new_bias is not None:
        new_consumer.bias.copy_(new_bias.to(new_consumer.bias))
    for name in pair.resized:  # the kept channels' BatchNorms and depthwise filters: exact sub-layers
        old, new = model.get_submodule(name), built[name]
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            if getattr(new, attribute, None) is not None:
                getattr(new, attribute).copy_(getattr(old, attribute).detach()[index])
        if isinstance(new, nn.BatchNorm2d):
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    return built, error


@torch.no_grad()
def fill_heads(model: nn.Module, row: LayerPlan, stats: InputStats) -> tuple[dict, None]:
    """An attention row's new query, key, value and output layers, each head reduced to
    `row.rank / heads` dimensions by the joint SVDs of lrdaccel.factorize.heads, whitened by the
    attention input's statistics `stats` (from the model's current layers, untouched)."""
    pair = row.narrow
    query, key = (model.get_submodule(name) for name in pair.co_producers)
    value, output = model.get_submodule(row.name), model.get_submodule(pair.consumer)
    second, mean = stats.covariance(), stats.mean()
    augmented = torch.cat([torch.cat([second, mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
    rank = row.rank // pair.heads

    def with_bias(layer):
        bias = layer.bias.detach() if layer.bias is not None else _weight(layer).new_zeros(_weight(layer).shape[0])
        return torch.cat([_weight(layer).detach().double(), bias.double()[:, None]], 1)

    new_query, new_key = joint_query_key(with_bias(query), with_bias(key), augmented, pair.heads, rank)
    value_bias = None if value.bias is None else value.bias.detach()
    new_value, new_output, shift = joint_value_output(_weight(value).detach(), value_bias, _weight(output).detach(),
                                                      second, pair.heads, rank)
    built = narrowed_like(model, row)
    for name, weights in zip(pair.co_producers, (new_query, new_key)):
        layer = built[name]
        _weight(layer).copy_(weights[:, :-1].to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(weights[:, -1].to(layer.bias))
    _weight(built[row.name]).copy_(new_value.to(value.weight))
    if built[row.name].bias is not None:
        built[row.name].bias.zero_()
    _weight(built[pair.consumer]).copy_(new_output.to(output.weight))
    if output.bias is not None:
        built[pair.consumer].bias.copy_((output.bias.detach().double() + shift).to(output.bias))
    return built, None


def narrowed_rows(model: nn.Module) -> list[LayerPlan]:
    """The narrow rows of a narrowed model, read off its marked producers (for `lrd.save`)."""
    return [getattr(module, MARK) for _, module in model.named_modules() if isinstance(getattr(module, MARK, None),
                                                                                          LayerPlan)]


def set_head_size(model: nn.Module, row: LayerPlan) -> list[tuple[Any, str, Any]]:
    """Set a narrowed attention module's head size (and all_head_size) to the row's; returns
    [(module, attribute, old value)] of what changed (nothing for other rows, or if already set)."""
    if not row.narrow.heads:
        return []
    attention = model.get_submodule(row.narrow.attention)
    targets = {head_size_attribute(attention): row.rank // row.narrow.heads}
    if isinstance(getattr(attention, "all_head_size", None), int):
        targets["all_head_size"] = row.rank
    changed = [(attention, name, getattr(attention, name)) for name, value in targets.items()
               if getattr(attention, name) != value]
    for name, value in targets.items():
        setattr(attention, name, value)
    return changed


def narrow_config(model: nn.Module, plan: Plan) -> list[tuple[Any, str, Any]]:
    """Make the model's own records agree with its narrowed shapes: each narrowed attention
    module's head size, and an HF config's FFN width where every FFN of the model narrows to the
    same width (so that `save_pretrained` / `from_pretrained` rebuild the narrowed shapes);
    otherwise the config is left alone and the plan, saved by `lrd.save`, is the record of each
    layer's width (and always of the head sizes: an HF config has one head size per hidden size).

    Returns:
        [(object, attribute, old value)] of what changed, to undo it.
    """
    changed = [change for row in plan.narrowed for change in set_head_size(model, row)]
    rows, config = [row for row in plan.narrowed if not row.narrow.heads], getattr(model, "config", None)
    if not rows or config is None or len({row.rank for row in rows}) != 1:
        return changed
    for field, layers in CONFIG_WIDTHS:
        width = getattr(config, field, None)
        if field == "n_inner" and hasattr(config, field) and width is None:
            width = 4 * getattr(config, "n_embd", 0)  # GPT-2's default FFN width
        if width is not None and getattr(config, layers, None) == len(rows) and all(
                row.shape["out"] == width for row in rows):
            changed.append((config, field, getattr(config, field)))
            setattr(config, field, rows[0].rank)
            break
    return changed
