"""Reading merged blocks back from a model: for the freezer (each block a unit of three convs)
and for saving (the plan rows that rebuild them)."""

from __future__ import annotations

from torch import nn

from lrdaccel.layers.merged import MergedBlock, MergedConv2d
from lrdaccel.planning.rows import LayerPlan, MergeBlock


def merged_blocks(model: nn.Module) -> dict[str, MergedBlock]:
    """Every merged bottleneck in `model`, by its middle conv's current qualified name.

    Raises:
        ValueError: a block whose three convs are not all there (a model edited after merging).
    """
    convs: dict[str, dict[str, tuple[str, MergedConv2d]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MergedConv2d):
            convs.setdefault(module.merge_name, {})[module.merge_role] = (name, module)
    blocks = {}
    for key, roles in convs.items():
        if set(roles) != {"first", "middle", "last"}:
            raise ValueError(f"merged block {key!r} is incomplete: found {sorted(roles)} of first, middle, last")
        blocks[roles["middle"][0]] = MergedBlock(roles["first"][1], roles["middle"][1], roles["last"][1])
    return blocks


def merged_rows(model: nn.Module) -> list[LayerPlan]:
    """The "merged" plan rows that rebuild `model`'s merged blocks on its undecomposed architecture."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, MergedConv2d) or module.merge_role != "middle":
            continue
        block: MergeBlock = module.merge_block
        if block is None or not name.endswith(module.merge_name):
            raise ValueError(f"merged conv {name!r} has lost its merge record; it cannot be saved as a plan")
        prefix = name[:len(name) - len(module.merge_name)]  # the model may be wrapped since merging
        names = {k: (prefix + v if k in ("first", "bn1", "bn2", "last", "bn3") and v else v)
                 for k, v in vars(block).items()}
        rows.append(LayerPlan(name, "merged", (module.in_channels, module.out_channels), "saved", module.source,
                              module.dense_shape, tuple(module.stride), merge=MergeBlock(**names)))
    return rows
