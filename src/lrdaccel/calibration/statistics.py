"""Calibration: what each layer's inputs look like on real data, for activation-aware decomposition.

`collect_input_stats` runs the model on calibration batches with forward pre-hooks on the
chosen layers and streams sum(x x^T), sum(x) and the count of input vectors into float64
accumulators per layer: memory is channels^2 per layer whatever the number of batches, and no
activation is kept. The layers' `from_dense(..., input_covariance=stats.covariance())` turn the
statistics into factors (`decompose(..., method="whiten")` does this), so ranks, structure,
freezing and save/load are exactly those of plain decomposition. Sequential calibration
(lrdaccel.decomposition.sequential) streams `PairedStats` instead: the inputs of one layer in the original and
in the partly decomposed model, side by side.

What counts as "the input" of each layer type (the vectors its weight multiplies):
- Linear / HF Conv1D: every vector along the last dimension (every token), except padding: when
  a batch is a mapping with a 2-D `attention_mask` (a tokenizer's output), an input shaped
  [batch, tokens, d] contributes only its real tokens. Padded positions are not text, and in
  short sentences they would outnumber the words.
- 1x1 Conv2d: every pixel the conv reads after its own padding and stride subsampling; a
  zero-padded position is a zero vector (it adds to the count, not the sum: a uniform rescale of
  the covariance, which whitening ignores). Reflect/replicate/circular padding is reproduced.
- k x k Conv2d (Tucker-2): every pixel of the unpadded input, as channel vectors: the channel
  covariance of the C (x) I approximation of the patch covariance (see factorize/whiten.py).

Checking and calling batches is in lrdaccel.calibration.batches; running a model only as far as
the layers of interest in lrdaccel.calibration.passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import kept_modes, model_device, move_inputs
from lrdaccel.calibration.batches import call_batch, check_calibration, layers_by_name, token_mask
from lrdaccel.calibration.passes import hooked

# Input vectors folded into the accumulator at once: bounds the float64 copy of an activation
# (~32 MiB at this many elements) however large the calibration batch.
_CHUNK_ELEMENTS = 1 << 22


def _zeros(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64, device=device)


@dataclass
class InputStats:
    """Streamed first and second moments of one layer's inputs.

    Attributes:
        sum_outer: float64 [d, d], sum over every input vector x of x x^T (None before any input).
        sum_rows: float64 [d], sum of the input vectors (for the mean a bias absorbs).
        count: how many input vectors were summed.
    """

    sum_outer: torch.Tensor | None = None
    sum_rows: torch.Tensor | None = None
    count: int = 0

    def add(self, rows: torch.Tensor) -> None:
        """Fold in input vectors `rows` [n, d], in chunks, in float64."""
        if self.sum_outer is None:
            self.sum_outer = _zeros(rows.shape[1], rows.shape[1], device=rows.device)
            self.sum_rows = _zeros(rows.shape[1], device=rows.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].to(torch.float64)
            self.sum_outer.addmm_(chunk.T, chunk)
            self.sum_rows += chunk.sum(0)
        self.count += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        """E[x x^T] over the inputs seen (uncentred: the bias does not absorb the mean of x)."""
        if not self.count:
            raise ValueError("no inputs were recorded")
        return self.sum_outer / self.count

    def mean(self) -> torch.Tensor:
        """E[x] over the inputs seen."""
        if not self.count:
            raise ValueError("no inputs were recorded")
        return self.sum_rows / self.count

    def finite(self) -> bool:
        return self.sum_outer is None or bool(torch.isfinite(self.sum_outer).all() and torch.isfinite(self.sum_rows).all())


@dataclass
class PairedStats:
    """Streamed moments of paired rows from two models fed the same batches: x from the original
    model and x_hat from the partly decomposed one, row i of each from the same token or pixel.
    For one layer's inputs (x and x_hat of the same width) they give the closed-form re-solve of
    the layer so its output on x_hat matches the original layer's on x; with x the original
    layer's output and x_hat what the new layer's earlier factors output, they give its last
    factor (lrdaccel.decomposition.sequential).

    Attributes:
        decomposed: the moments of x_hat (E[x_hat x_hat^T], E[x_hat]).
        sum_cross: float64 [d_x, d_x_hat], sum of x x_hat^T.
        sum_original: float64 [d_x], sum of x.
    """

    decomposed: InputStats = field(default_factory=InputStats)
    sum_cross: torch.Tensor | None = None
    sum_original: torch.Tensor | None = None

    def add(self, original: torch.Tensor, decomposed: torch.Tensor) -> None:
        """Fold in paired rows: `original` [n, d_x] (x) and `decomposed` [n, d_x_hat] (x_hat)."""
        if original.shape[0] != decomposed.shape[0]:
            raise ValueError(f"the original and decomposed models gave different numbers of rows "
                             f"({original.shape[0]} and {decomposed.shape[0]}) for the same batch")
        if self.sum_cross is None:
            self.sum_cross = _zeros(original.shape[1], decomposed.shape[1], device=original.device)
            self.sum_original = _zeros(original.shape[1], device=original.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, original.shape[1], decomposed.shape[1]))
        for start in range(0, original.shape[0], step):
            x = original[start:start + step].to(torch.float64)
            self.sum_cross.addmm_(x.T, decomposed[start:start + step].to(torch.float64))
            self.sum_original += x.sum(0)
        self.decomposed.add(decomposed)

    @property
    def count(self) -> int:
        return self.decomposed.count

    def cross(self) -> torch.Tensor:
        """E[x x_hat^T]."""
        return self.sum_cross / self.count

    def original_mean(self) -> torch.Tensor:
        """E[x]."""
        return self.sum_original / self.count

    def finite(self) -> bool:
        return self.decomposed.finite() and (self.sum_cross is None or bool(
            torch.isfinite(self.sum_cross).all() and torch.isfinite(self.sum_original).all()))


def input_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The vectors `module`'s weight multiplies, as rows [n, d] (see the module docstring);
    with a token `mask` [batch, tokens], only the real tokens of a [batch, tokens, d] input."""
    if not isinstance(module, nn.Conv2d):
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(x.device)]
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
            mapping: drop labels first, e.g. `[x for x, _ in loader]`. A mapping's 2-D
            `attention_mask` keeps padded tokens out of the statistics.
        progress: show a tqdm bar over batches.

    Returns:
        {name: InputStats}; a layer the forward never reached has count 0.

    Raises:
        ValueError: no batches, a batch the model fails on (naming its index), a name that is not
            a supported layer, or NaN/Inf inputs reaching a layer (naming it).
    """
    check_calibration(calibration)
    modules = layers_by_name(model, names)
    stats = {name: InputStats() for name in modules}
    device = model_device(model)
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def recorder(name: str, module: nn.Module) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            stats[name].add(input_rows(module, x.detach(), current["mask"]))

        return hook

    n_batches = 0
    with kept_modes(model), hooked(modules, recorder):
        model.eval()
        for index, batch in enumerate(tqdm(calibration, desc="calibrating", unit="batch", disable=not progress)):
            batch = move_inputs(batch, device)
            current["mask"] = token_mask(batch)
            call_batch(model, batch, index)
            n_batches += 1
    if not n_batches:
        raise ValueError("calibration gave no batches")
    for name, item in stats.items():
        if not item.finite():
            raise ValueError(f"layer {name!r}: its calibration inputs contain NaN/Inf")
    return stats
