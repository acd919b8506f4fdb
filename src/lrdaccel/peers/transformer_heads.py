"""Attention heads of Hugging Face encoders, for structured pruning that removes whole heads.

torch-pruning removes the rows of a head from the query, key and value projections (and the
matching columns of the output projection) but cannot know that the attention module also keeps
its head count: transformers' BertSelfAttention stores `num_attention_heads` and `all_head_size`,
ViT's attention `num_attention_heads` (the projections, renamed q_proj/k_proj/v_proj in
transformers 5, are found by what they compute, not by name). Keeping the head size and changing
the count keeps the attention's scaling, so a model pruned at ratio 0 computes exactly what the
original did.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim")


@dataclass(frozen=True)
class AttentionHeads:
    """One attention module: its query/key/value projections (names in the model), heads, head size."""

    name: str
    projections: tuple[str, ...]
    heads: int
    head_size: int


def attention_modules(model: nn.Module, skip: set[str] = frozenset()) -> dict[str, nn.Module]:
    """Modules that declare an int `num_attention_heads` (HF encoders' self-attention), by name,
    but those named in `skip`.

    Raises:
        ValueError: one has no head size attribute, or uses grouped-query attention (fewer key/value
            heads than query heads), which this module does not prune.
    """
    found = {}
    for name, module in model.named_modules():
        heads = getattr(module, "num_attention_heads", None)
        if (isinstance(heads, bool) or not isinstance(heads, int) or isinstance(module, nn.MultiheadAttention)
                or name in skip):
            continue
        if head_size(module) is None:
            raise ValueError(f"attention module {name!r} ({type(module).__name__}) has num_attention_heads but no "
                             f"{' or '.join(HEAD_SIZE_ATTRS)}: cannot prune its heads; exclude it")
        groups = getattr(module, "num_key_value_groups", 1)
        if groups != 1 or getattr(module, "num_key_value_heads", heads) != heads:
            raise ValueError(f"attention module {name!r} ({type(module).__name__}) uses grouped-query attention, "
                             f"which lrdaccel.peers.prune does not prune; exclude it")
        found[name] = module
    return found


def head_size(module: nn.Module) -> int | None:
    for attr in HEAD_SIZE_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_projections(name: str, module: nn.Module, coupled: dict[str, set[str]]) -> AttentionHeads:
    """The query/key/value projections of one attention module: its Linear children whose output
    channels torch-pruning couples into one group (`coupled`: layer name -> names of the layers whose
    output channels share its group). The output projection's outputs join the residual stream
    instead, so it is never among them, whatever it is called.

    Raises:
        ValueError: fewer than two such children (a fused qkv projection, or another form).
    """
    prefix = name + "." if name else ""
    children = [prefix + child for child, layer in module.named_children() if isinstance(layer, nn.Linear)]
    best: list[str] = []
    for child in children:
        together = sorted(c for c in children if c in coupled.get(child, {child}))
        if len(together) > len(best):
            best = together
    size = head_size(module)
    if len(best) < 2:
        raise ValueError(f"attention module {name!r} ({type(module).__name__}): cannot find separate query/key/value "
                         f"projections among its Linear children {children} (a fused qkv projection is not "
                         f"supported); exclude it")
    return AttentionHeads(name, tuple(best), module.num_attention_heads, size)


def set_heads(module: nn.Module, heads: int) -> None:
    """Record a new head count on an attention module (and its all_head_size / num_heads)."""
    module.num_attention_heads = heads
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = heads * head_size(module)
    if isinstance(getattr(module, "num_heads", None), int):
        module.num_heads = heads


def update_heads(model: nn.Module, attention: list[AttentionHeads]) -> dict[str, tuple[int, int]]:
    """After pruning: each attention module's head count from its projections' widths.

    Returns:
        name -> (heads before, heads after).

    Raises:
        ValueError: the projections disagree, are not a whole number of heads, or have none left.
    """
    changed = {}
    for entry in attention:
        module = model.get_submodule(entry.name)
        widths = {model.get_submodule(p).out_features for p in entry.projections}
        if len(widths) != 1 or next(iter(widths)) % entry.head_size:
            raise ValueError(f"pruning left {entry.name!r} with projection widths {sorted(widths)}, not one whole "
                               f"number of {entry.head_size}-wide heads")
        heads = next(iter(widths)) // entry.head_size
        if heads == 0:
            raise ValueError(f"pruning removed every head of {entry.name!r} (global pruning ranks heads across "
                               f"modules); lower the budget's ratio or use global_pruning=False")
        set_heads(module, heads)
        changed[entry.name] = (entry.heads, heads)
    return changed
