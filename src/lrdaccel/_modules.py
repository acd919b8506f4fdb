"""Model-walking helpers shared by plan, surgery and io."""

from __future__ import annotations

from torch import nn

# Parents whose forward always reads a child Linear's `.weight` instead of calling it: decomposing
# that child buys nothing (LowRankModule.weight would rebuild the dense weight every call).
# nn.TransformerEncoderLayer is not listed: only its eval-mode fast path reads linear1/linear2.weight
# (getting the rebuilt dense weight, so still correct); training calls the factors.
DIRECT_WEIGHT_READERS: dict[type, tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every module name that holds it directly (tied weights show up twice)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return owners


def direct_reader(model: nn.Module, name: str) -> str | None:
    """Name the parent that reads this module's weight directly, if any."""
    if not name:
        return None
    parent, attr = parent_and_attr(model, name)
    for parent_type, attrs in DIRECT_WEIGHT_READERS.items():
        if isinstance(parent, parent_type) and attr in attrs:
            return type(parent).__name__
    return None
