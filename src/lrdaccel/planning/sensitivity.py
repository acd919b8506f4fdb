"""How much a model's output suffers when each layer is truncated to each rank: the numbers rank
allocation (lrdaccel.planning.allocation) spends a budget by.

A layer's loss at rank r is what truncation does to its own output, measured on calibration
inputs, times a weight for how much that output matters to the model's:

- Truncation loss: E||(W - W_r) x||^2 per input vector, for the whitened factorization at every
  rank, from the input statistics alone (`factorize.whiten.whitened_svd_truncation_loss`, exact
  for SVD; the HOSVD bound for Tucker-2).
- Weight, `sensitivity="fisher"` (default): the mean squared gradient of the model output with
  respect to the layer's output, per output element and sample. An error e in the layer's output
  moves a scalar f of the model's output by about g^T e, whose mean square over an isotropic e
  is ||g||^2 E||e||^2 / width: the Fisher / Gauss-Newton estimate (ASVD, FWSVD) of what the
  truncation costs. f is the task loss where labels are given (log-likelihood of the true
  class), otherwise distillation to the original: for logits [batch, classes], the log-likelihood
  of a class sampled from the model's own prediction (the Fisher of KL(original || decomposed));
  for token states [batch, tokens, d], a random direction of the L2-normalised, mask-averaged
  embedding (the Gauss-Newton of the cosine distance). Needs one backward per batch and probe.
- Weight, `sensitivity="output"`: 1 / E||W x||^2, the layer's relative output error; forward
  only, and blind to how errors propagate (on MiniLM it allocated worse than one ratio for all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import kept_modes, output_tensor
from lrdaccel._settings import check_choice, check_int
from lrdaccel.calibration.batches import batches_in_memory, call_batch, layers_by_name, token_mask
from lrdaccel.calibration.passes import hooked, probe_calls
from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.factorize.ranks import Rank
from lrdaccel.factorize.whiten import (
    DEFAULT_DAMPING,
    whitened_svd_truncation_loss,
    whitened_tucker2_truncation_loss,
)
from lrdaccel.layers.svd import dense_linear_weight

SENSITIVITIES = ("fisher", "output")


@dataclass
class LayerSensitivity:
    """One layer's loss at every rank.

    Attributes:
        weight: the layer's sensitivity weight (see the module docstring).
        energy: E||W x||^2 of the layer's output on the calibration inputs.
        truncation: float64 truncation loss per input vector: [full + 1] indexed by rank for
            SVD, [C_out + 1, C_in + 1] indexed by (rank_out, rank_in) for Tucker-2.
        positions: output vectors (tokens or pixels) the layer produces per calibration forward.
    """

    weight: float
    energy: float
    truncation: torch.Tensor
    positions: int

    def loss(self, rank: Rank) -> float:
        """Weighted loss at `rank` (an int for SVD, (rank_in, rank_out) for Tucker-2; None: 0)."""
        if rank is None:
            return 0.0
        value = self.truncation[rank] if isinstance(rank, int) else self.truncation[rank[1], rank[0]]
        return self.weight * float(value)


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    names: list[str],
    calibration: Iterable[Any],
    *,
    sensitivity: str = "fisher",
    labels: Iterable[torch.Tensor] | None = None,
    damping: float = DEFAULT_DAMPING,
    probes: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, LayerSensitivity]:
    """Each named layer's weighted truncation loss at every rank (see the module docstring).

    Args:
        model: the undecomposed model (not changed; modes restored).
        names: the Linear / Conv1D / Conv2d layers to measure.
        calibration: unlabeled batches (read into memory), called as model(batch) etc.
        sensitivity: "fisher" or "output".
        labels: optional class labels, one tensor per batch: the Fisher weight then comes from
            the task loss instead of the model's own predictions.
        damping: whitening's relative diagonal loading.
        probes: backward passes per batch for the Fisher weight (sampled classes or directions).
        seed: for the sampled classes or directions.

    Raises:
        ValueError: bad settings, no batches, a batch the model fails on, NaN/Inf inputs, labels
            that do not match the batches, an output the Fisher weight cannot read, or a layer
            the calibration never reaches.
    """
    check_choice("sensitivity", sensitivity, SENSITIVITIES)
    check_int("probes", probes, 1)
    batches = batches_in_memory(model, calibration)
    modules = layers_by_name(model, names)
    with kept_modes(model):
        model.eval()
        order = probe_calls(model, modules, batches[0])
    if order.unreached:
        raise ValueError(f"layer {order.unreached[0]!r}: the calibration forward never reaches it; "
                         f"exclude it from the plan or give batches that use it")
    stats = collect_input_stats(model, names, batches, progress=progress)
    if sensitivity == "fisher":
        weights = fisher_weights(model, modules, batches, labels=labels, probes=probes, seed=seed, progress=progress)
    result = {}
    for name, module in modules.items():
        truncation = truncation_loss(module, stats[name].covariance(), damping)
        energy = float(truncation.flatten()[0])
        factor = weights[name] if sensitivity == "fisher" else 1.0 / energy if energy > 0 else 0.0
        result[name] = LayerSensitivity(factor, energy, truncation, order.positions[name])
    return result


def truncation_loss(module: nn.Module, covariance: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """A layer's E||(W - W_r) x||^2 at every rank, index [0] (or [0, 0]) its output energy: the
    whitened SVD's for a Linear / Conv1D / 1x1 conv, the Tucker-2 HOSVD bound [rank_out, rank_in]
    for a k x k conv."""
    if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
        return whitened_tucker2_truncation_loss(module.weight, covariance, damping)
    weight = module.weight[:, :, 0, 0] if isinstance(module, nn.Conv2d) else dense_linear_weight(module)
    return whitened_svd_truncation_loss(weight, covariance, damping)


def fisher_weights(model: nn.Module, modules: dict[str, nn.Module], batches: list[Any], *,
                   labels: Iterable[torch.Tensor] | None = None, probes: int = 2, seed: int = 0,
                   progress: bool = False) -> dict[str, float]:
    """Mean over samples of sum over each layer's output vectors of ||d f / d y||^2 / width (see
    the module docstring for f). Batches must be on the model's device; the model is not changed
    (gradients are taken with respect to the layers' outputs only, never its parameters)."""
    label_list = None if labels is None else list(labels)
    if label_list is not None and len(label_list) != len(batches):
        raise ValueError(f"labels: {len(label_list)} tensors for {len(batches)} calibration batches")
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(modules, 0.0)
    samples = 0
    outputs: dict[str, list[torch.Tensor]] = {}

    def keep_output(name: str, module: nn.Module):
        def hook(_m, args, kwargs, output):
            if not output.requires_grad:  # nothing upstream needs a gradient: start the graph here
                output.requires_grad_(True)
            output.retain_grad()
            outputs.setdefault(name, []).append(output)

        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with kept_modes(model), hooked(modules, keep_output, after=True), torch.enable_grad():
            model.eval()
            rounds = 1 if label_list is not None else probes
            for index, batch in enumerate(tqdm(batches, desc="sensitivity", unit="batch", disable=not progress)):
                mask = token_mask(batch)
                for _ in range(rounds):
                    outputs.clear()
                    output = output_tensor(call_batch(model, batch, index))
                    target = None if label_list is None else label_list[index].to(output.device)
                    _probe(output, mask, target, generator).backward()
                    for name, tensors in outputs.items():
                        for tensor in tensors:
                            if tensor.grad is not None:
                                sums[name] += _squared_gradient(modules[name], tensor.grad, mask)
                        if not math.isfinite(sums[name]):
                            raise ValueError(f"calibration batch {index}: NaN/Inf gradient at layer {name!r}")
                samples += rounds * output.shape[0]
    finally:
        outputs.clear()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: value / samples for name, value in sums.items()}


def _probe(output: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor | None,
           generator: torch.Generator) -> torch.Tensor:
    """The scalar whose gradient measures sensitivity (see the module docstring)."""
    if output.dim() == 2:  # logits
        log_probabilities = F.log_softmax(output.float(), -1)
        if labels is None:
            labels = torch.multinomial(log_probabilities.detach().exp().cpu(), 1, generator=generator)[:, 0]
        return log_probabilities.gather(1, labels.to(output.device).view(-1, 1)).sum()
    if output.dim() == 3 and labels is None:  # token states: the mask-averaged embedding
        weights = (torch.ones(output.shape[:2], device=output.device) if mask is None else mask.to(output.device))
        weights = weights.unsqueeze(-1).to(output.dtype)
        embedding = F.normalize((output * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1)
        direction = torch.randn(embedding.shape, generator=generator, dtype=embedding.dtype).to(embedding.device)
        return (embedding * direction).sum()
    raise ValueError(f"sensitivity='fisher' reads logits [batch, classes] (labels optional) or token states "
                     f"[batch, tokens, width] (no labels); the model gave {tuple(output.shape)}"
                     f"{' with labels' if labels is not None else ''}: use sensitivity='output'")


def _squared_gradient(module: nn.Module, grad: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Sum over output vectors of ||grad||^2 / width (real tokens only under a mask)."""
    if isinstance(module, nn.Conv2d):
        width = grad.shape[1]
    else:
        width = grad.shape[-1]
        if mask is not None and grad.dim() == 3 and tuple(grad.shape[:2]) == tuple(mask.shape):
            grad = grad[mask.to(grad.device)]
    return float(grad.detach().to(torch.float64).square().sum()) / width
