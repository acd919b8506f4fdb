"""Calibration: what each layer's inputs look like on real data, for activation-aware decomposition.

`collect_input_stats` runs the model on calibration batches with forward pre-hooks on the
chosen layers and streams sum(x x^T) and the count of input vectors into a float64 accumulator
per layer: memory is channels^2 per layer whatever the number of batches, and no activation is
kept. The layers' `from_dense(..., input_covariance=stats.covariance())` turn the statistics
into factors (`decompose(..., method="whiten")` does this), so ranks, structure, freezing and
save/load are exactly those of plain decomposition.

What counts as "the input" of each layer type (the vectors its weight multiplies):
- Linear / HF Conv1D: every vector along the last dimension (every token).
- 1x1 Conv2d: every pixel the conv reads after its own padding and stride subsampling; a
  zero-padded position is a zero vector (it adds to the count, not the sum: a uniform rescale of
  the covariance, which whitening ignores). Reflect/replicate/circular padding is reproduced.
- k x k Conv2d (Tucker-2): every pixel of the unpadded input, as channel vectors: the channel
  covariance of the C (x) I approximation of the patch covariance (see factorize/whiten.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import call_model, model_device, move_inputs
from lrdaccel.layers import entry_for

# Input vectors folded into the accumulator at once: bounds the float64 copy of an activation
# (~32 MiB at this many elements) however large the calibration batch.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class InputStats:
    """Streamed second moment of one layer's inputs.

    Attributes:
        sum_outer: float64 [d, d], sum over every input vector x of x x^T (None before any input).
        count: how many input vectors were summed.
    """

    sum_outer: torch.Tensor | None = None
    count: int = 0

    def add(self, rows: torch.Tensor) -> None:
        """Fold in input vectors `rows` [n, d], in chunks, in float64."""
        if self.sum_outer is None:
            self.sum_outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].to(torch.float64)
            self.sum_outer.addmm_(chunk.T, chunk)
        self.count += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        """E[x x^T] over the inputs seen (uncentred: the bias does not absorb the mean of x)."""
        if not self.count:
            raise ValueError("no inputs were recorded")
        return self.sum_outer / self.count


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vectors `module`'s weight multiplies, as rows [n, d] (see the module docstring)."""
    if not isinstance(module, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # unbatched [C, H, W]
        x = x.unsqueeze(0)
    if module.kernel_size == (1, 1):
        x = _pad_like(module, x)[:, :, ::module.stride[0], ::module.stride[1]]
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _pad_like(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # A 1x1 conv's "same" padding is zero and "valid" is zero by definition.
    if isinstance(conv.padding, str) or conv.padding == (0, 0):
        return x
    ph, pw = conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode)


def _check_iterable(calibration: Any) -> None:
    if calibration is None:
        raise ValueError("calibration batches are required: give a DataLoader or a list of batches")
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of batches (a DataLoader or a list); got a single "
                         f"{type(calibration).__name__}: wrap one batch in a list, e.g. [batch]")


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    names: Iterable[str],
    calibration: Iterable[Any],
    *,
    progress: bool = False,
) -> dict[str, InputStats]:
    """Run `model` on every calibration batch and return each named layer's input statistics.

    The model runs in eval mode without gradients; every module's training flag is restored and
    every hook removed afterwards, also on error. Batches are moved to the model's device.

    Args:
        model: the (undecomposed) model.
        names: qualified names of the Linear / Conv1D / Conv2d layers to observe.
        calibration: an iterable of batches (DataLoader, list, generator). A batch is called as
            model(batch) for a tensor, model(*batch) for a tuple/list, model(**batch) for a
            mapping: drop labels first, e.g. `[x for x, _ in loader]`.
        progress: show a tqdm bar over batches.

    Returns:
        {name: InputStats}; a layer the forward never reached has count 0.

    Raises:
        ValueError: no batches, a batch the model fails on (naming its index), a name that is not
            a supported layer, or NaN/Inf inputs reaching a layer (naming it).
    """
    _check_iterable(calibration)
    modules = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r}: the model has no such module") from None
        if entry_for(module) is None:
            raise ValueError(f"layer {name!r}: cannot collect input statistics of a {type(module).__name__}")
        modules[name] = module
    stats = {name: InputStats() for name in modules}
    device = model_device(model)
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(_recorder(module, stats[name]), with_kwargs=True))
        model.eval()
        n_batches = 0
        for index, batch in enumerate(tqdm(calibration, desc="calibrating", unit="batch", disable=not progress)):
            try:
                call_model(model, move_inputs(batch, device))
            except Exception as error:  # whatever the model raises, say which batch and how it was called
                raise ValueError(
                    f"calibration batch {index}: the model failed on it ({type(error).__name__}: {error}); "
                    f"batches are called as model(tensor), model(*tuple) or model(**dict): drop labels first"
                ) from error
            n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not n_batches:
        raise ValueError("calibration gave no batches")
    for name, item in stats.items():
        if item.count and not torch.isfinite(item.sum_outer).all():
            raise ValueError(f"layer {name!r}: its calibration inputs contain NaN/Inf")
    return stats


def _recorder(module: nn.Module, stats: InputStats) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        stats.add(_input_rows(module, x.detach()))

    return hook
