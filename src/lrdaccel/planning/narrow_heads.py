"""Finding attention whose heads can narrow: `query / key / value -> scaled_dot_product_attention
-> output projection` in the data flow of one recorded forward (lrdaccel.planning.dataflow).

Each head's query/key pair and value/output pair are products with no nonlinearity inside
(lrdaccel.factorize.heads), so every head can keep fewer dimensions if the attention module's
forward takes its head size from an attribute (`attention_head_size` in HF BERT, `head_dim` in HF
ViT) and keeps its own score scale (`scaling`). The walk goes back from each
scaled_dot_product_attention call through views and transposes to the three Linear layers, and
forward to the Linear that reads the heads' concatenated output; a near miss says why.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from lrdaccel.planning.dataflow import Op

SHAPE_OPS = frozenset({"view", "reshape", "transpose", "permute", "contiguous", "clone", "flatten"})
HEAD_SIZE_ATTRIBUTES = ("attention_head_size", "head_dim")


def head_size_attribute(module: nn.Module) -> str | None:
    """The attribute an attention module's forward reads its head size from, or None."""
    return next((a for a in HEAD_SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), int)), None)


def find_head_candidates(ops: list[Op], modules: dict[str, nn.Module], calls: Counter) -> list[dict]:
    """{"producer": value, "co_producers": (query, key), "consumer": output, "attention": the module
    holding the head size, "heads", "head_size", "reason"} per attention call, in execution order."""
    found = []
    for op in ops:
        if op.name != "scaled_dot_product_attention" or len(op.inputs) < 3 or len(op.shape) != 4:
            continue
        heads, size = op.shape[1], op.shape[-1]
        query, key, value = (_back(ops, i) for i in op.inputs[:3])
        consumer = _forward(ops, op)
        reasons = []
        if None in (query, key, value):
            reasons.append("a query, key or value is not one Linear's output read only by the attention")
        elif len({tuple(x.inputs) for x in (query, key, value)}) != 1:
            reasons.append("query, key and value read different inputs (cross-attention)")
        if consumer is None:
            reasons.append("the heads' output is not read by one Linear alone")
        names = [x.module if x is not None else None for x in (value, query, key)]
        parent = names[0].rsplit(".", 1)[0] if names[0] and "." in names[0] else ""
        attention = modules.get(parent)
        attribute = head_size_attribute(attention) if attention is not None else None
        if attribute is None or getattr(attention, attribute) != size or not hasattr(attention, "scaling"):
            reasons.append(f"the attention module {parent or '(none)'} keeps no head size of {size} and score "
                           f"scale (attention_head_size / head_dim and scaling) its forward reads")
        shared = [n for n in [*names, consumer.module if consumer else None] if n and calls[n] > 1]
        if shared:
            reasons.append(f"{shared[0]} is called {calls[shared[0]]} times (shared weights)")
        found.append({"producer": names[0], "co_producers": tuple(n for n in names[1:] if n),
                      "consumer": consumer.module if consumer else None, "attention": parent, "heads": heads,
                      "head_size": size, "reason": "; ".join(reasons) or None})
    return found


def _back(ops: list[Op], index: int) -> Op | None:
    """The Linear call whose result reaches op `index` through shape ops only, read by nothing else."""
    op = ops[index]
    while op.name in SHAPE_OPS and len(op.inputs) == 1 and len(op.readers) == 1:
        op = ops[op.inputs[0]]
    return op if op.kind == "linear" and len(op.readers) == 1 and op.module else None


def _forward(ops: list[Op], start: Op) -> Op | None:
    """The Linear call that alone reads `start`'s result through shape ops, or None."""
    op = start
    while len(op.readers) == 1:
        op = ops[op.readers[0]]
        if op.kind == "linear":
            return op if len(op.inputs) == 1 and op.module else None
        if op.name not in SHAPE_OPS:
            return None
    return None
