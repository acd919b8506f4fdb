"""A model made into a classifier for a task: what every variant of a race starts from.

- An encoder (its output has `last_hidden_state`, or is [batch, tokens, width]) gets a head:
  the mean of its real tokens' states (the attention mask leaves padding out), then a Linear to
  the task's classes (`EncoderClassifier`), as sentence-transformers pools MiniLM.
- A classifier whose logits have another number of classes gets its last Linear replaced by a
  new one (found by running one batch: the last Linear called whose output is the model's).
- A classifier with as many outputs as the task has classes is kept as it is (its own task).

The new head is initialised from `seed` and named in `head_names`, so that a race keeps it out
of decomposition (a random head has nothing to compress).

`classifier_plan` names a plan made for the pretrained model (`lrdaccel plan --model minilm`) as
the classifier's modules are named (under `encoder.`), so that it decomposes the classifier.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from lrdaccel._modules import call_model, kept_modes, output_tensor, parent_and_attr
from lrdaccel.planning import LayerPlan, Plan


class EncoderClassifier(nn.Module):
    """encoder -> masked mean over tokens -> Linear(width, classes)."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        states = output_tensor(self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        if attention_mask is None:
            return self.head(states.mean(1))
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)


def make_classifier(model: nn.Module, example_inputs: Any, num_classes: int, seed: int = 0
                    ) -> tuple[nn.Module, list[str]]:
    """(the classifier, the names of the modules it added or replaced).

    Args:
        model: a pretrained (or trained) model; not changed (the classifier holds a copy where it
            replaces a layer, and the model itself where it only adds a head).
        example_inputs: one batch as the task gives it.
        num_classes: the task's classes.
        seed: initialises the new head.

    Raises:
        ValueError: an output that is neither token states nor logits, or no Linear producing
            the logits to replace.
    """
    with torch.no_grad(), kept_modes(model):
        model.eval()
        calls: list[tuple[str, torch.Tensor]] = []
        names = {module: name for name, module in model.named_modules()}
        hooks = [m.register_forward_hook(lambda m, args, out: calls.append((names[m], out)))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            output = call_model(model, example_inputs)
        finally:
            for hook in hooks:
                hook.remove()
    generator = torch.Generator().manual_seed(seed)
    states = getattr(output, "last_hidden_state", None)
    tensor = states if isinstance(states, torch.Tensor) else output_tensor(output)
    if isinstance(states, torch.Tensor) or tensor.dim() == 3:
        classifier = EncoderClassifier(model, tensor.shape[-1], num_classes)
        _initialise(classifier.head, generator)
        return classifier, ["head"]
    if tensor.dim() != 2:
        raise ValueError(f"the model's output has shape {tuple(tensor.shape)}: expected logits [batch, classes] "
                         f"or token states [batch, tokens, width]")
    if tensor.shape[1] == num_classes:
        return model, []
    last = [name for name, out in calls if isinstance(out, torch.Tensor) and out.shape == tensor.shape
            and torch.equal(out, tensor)]
    if not last:
        raise ValueError(f"the model gives {tensor.shape[1]} outputs, the task has {num_classes} classes, and no "
                         f"Linear layer produces the logits to replace")
    classifier = copy.deepcopy(model)
    name = last[-1]
    old = classifier.get_submodule(name)
    head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    _initialise(head, generator)
    parent, attr = parent_and_attr(classifier, name)
    setattr(parent, attr, head)
    return classifier, [name]


def _initialise(head: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's own default initialisation, drawn from `generator` (the seed, not the global RNG)."""
    bound = 1 / head.in_features ** 0.5
    with torch.no_grad():
        head.weight.copy_(torch.empty_like(head.weight, device="cpu").uniform_(-bound, bound, generator=generator))
        if head.bias is not None:
            head.bias.copy_(torch.empty_like(head.bias, device="cpu").uniform_(-bound, bound, generator=generator))


def classifier_plan(plan: Plan, classifier: nn.Module) -> Plan:
    """`plan` with its rows named as `classifier` names its modules: a plan for the model an
    `EncoderClassifier` wraps names that model's layers, which the classifier holds under
    `encoder.`. A plan that already names the classifier's modules (or any other plan) is
    returned as it is, for `decompose` to check."""
    names = dict(classifier.named_modules())
    if not (isinstance(classifier, EncoderClassifier) and plan.layers
            and all(row.name not in names and f"encoder.{row.name}" in names for row in plan.layers)):
        return plan
    return Plan([_rooted(row, "encoder.") for row in plan.layers], ratio=plan.ratio, beta=plan.beta,
                meta=dict(plan.meta))


def _rooted(row: LayerPlan, prefix: str) -> LayerPlan:
    """A plan row (and the neighbours a merged or narrow row changes) with `prefix` before every
    module name."""
    merge, narrow = row.merge, row.narrow
    if merge is not None:
        merge = dataclasses.replace(merge, first=prefix + merge.first, bn1=prefix + merge.bn1, bn2=prefix + merge.bn2,
                                    last=prefix + merge.last, bn3=merge.bn3 and prefix + merge.bn3)
    if narrow is not None:
        narrow = dataclasses.replace(narrow, consumer=prefix + narrow.consumer,
                                     resized=tuple(prefix + name for name in narrow.resized),
                                     co_producers=tuple(prefix + name for name in narrow.co_producers),
                                     attention=narrow.attention and prefix + narrow.attention)
    return dataclasses.replace(row, name=prefix + row.name, merge=merge, narrow=narrow)
