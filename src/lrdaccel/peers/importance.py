"""How channels are ranked: the weights' magnitude, or a first-order Taylor estimate of the loss.

Taylor importance (|weight x gradient| summed over a channel's group, Molchanov et al. 2019)
needs the gradient of a loss. `prune` takes that loss as one callable, `loss_fn(model) -> loss`,
so any task fits (labels, distillation, a language-model loss); `labelled_loss` builds the usual
one from (inputs, labels) batches. The gradient is taken once, on a scratch copy, and given to
every pruned copy the search builds: the user's model and its `.grad` are never touched.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lrdaccel._modules import call_model, output_tensor
from lrdaccel.peers.prune_config import PruneConfig

LossFn = Callable[[nn.Module], torch.Tensor]


def labelled_loss(batches: Iterable[tuple[Any, torch.Tensor]],
                  criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
                  ) -> LossFn:
    """A `loss_fn` for Taylor importance: the mean of `criterion(output, labels)` over a few
    (inputs, labels) batches; the output is the model's main tensor (logits, last hidden state).

    Raises:
        ValueError: no batches, or a batch that is not an (inputs, labels) pair.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("labelled_loss needs at least one (inputs, labels) batch")
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"labelled_loss: batch {index} must be an (inputs, labels) pair, "
                             f"got {type(batch).__name__}")

    def loss_fn(model: nn.Module) -> torch.Tensor:
        losses = [criterion(output_tensor(call_model(model, inputs)), labels) for inputs, labels in batches]
        return torch.stack(losses).mean()

    return loss_fn


def make_importance(config: PruneConfig, tp) -> Any:
    """torch-pruning's importance object for the config (group L1/L2 magnitude, or group Taylor)."""
    if config.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=config.norm)


def describe(config: PruneConfig) -> str:
    return "taylor" if config.importance == "taylor" else f"magnitude (L{config.norm})"


def check_loss_fn(config: PruneConfig, loss_fn: LossFn | None) -> None:
    """Taylor needs a loss; magnitude takes none (a loss given there would be silently unused).

    Raises:
        ValueError: naming what is missing or extra.
    """
    if config.importance == "taylor" and loss_fn is None:
        raise ValueError("importance 'taylor' needs loss_fn: a callable model -> scalar loss "
                         "(e.g. lrdaccel.peers.labelled_loss(batches))")
    if config.importance != "taylor" and loss_fn is not None:
        raise ValueError(f"loss_fn is used only by importance='taylor', got importance={config.importance!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable model -> scalar loss, got {type(loss_fn).__name__}")


def taylor_gradients(model: nn.Module, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient of `loss_fn` on a scratch copy of `model` (zeros for a parameter
    the loss does not reach, which torch-pruning's Taylor importance would otherwise fail on).

    Raises:
        ValueError: the loss is not a finite scalar that depends on the parameters, or a gradient
            is not finite.
    """
    scratch = copy.deepcopy(model)
    for parameter in scratch.parameters():
        parameter.requires_grad_(True)
        parameter.grad = None
    with torch.enable_grad():
        loss = loss_fn(scratch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise ValueError(f"loss_fn must return a scalar tensor that depends on the model's parameters, got "
                         f"{type(loss).__name__}{shape}")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()})")
    loss.backward()
    grads = {}
    for name, parameter in scratch.named_parameters():
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        if not torch.isfinite(grad).all():
            raise ValueError(f"the gradient of loss_fn for {name!r} is not finite")
        grads[name] = grad.detach()
    return grads
