"""Unlabeled distillation: a decomposed model learns to give the original's outputs again.

After decomposition the model is close to the original, not equal; a short run that matches the
original's outputs on unlabeled real data (no labels, no task loss) recovers most of the rest:

    teacher = copy.deepcopy(model).eval()
    lrd.decompose(model, plan, method="whiten", calibration=batches)
    history = lrd.distill(model, teacher, train_batches, eval_batches=held_out, lr=1e-4, max_steps=300)

Batches are whatever the model is called with (a tensor, a tuple, a tokenizer's dict), already
batched: an epoch visits each once, in an order that depends only on (seed, epoch). The loss
compares the model's main output (a tensor, `.logits` or `.last_hidden_state`) with the
teacher's on the same batch:

- "kl": KL(teacher || student) on temperature-softened logits, times T^2;
- "cosine": 1 - cosine between the mask-averaged embeddings (an encoder's sentence embedding,
  as sentence-transformers pools it; padded tokens excluded by the batch's attention_mask);
- "mse": squared error of the real tokens' states relative to the teacher's energy;
- "cosine+mse": both, the default for token states ("auto": "kl" for logits);
- with `match_layers` (a regex on module names), the relative squared error of those modules'
  outputs too (every transformer block, say): a signal for each block, not only the last.

Everything else is `lrd.finetune`'s loop: sequential freezing (`schedule="rotate"`...), AMP,
DDP under torchrun (batches sharded over processes), and exact resume from checkpoints.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lrdaccel._modules import call_model, check_real_weights, kept_modes, move_inputs, output_tensor, unwrap
from lrdaccel._settings import resolve
from lrdaccel.calibration.batches import token_mask
from lrdaccel.training.config import DistillConfig
from lrdaccel.training.distributed import process_group
from lrdaccel.training.history import History
from lrdaccel.training.loop import Run
from lrdaccel.training.task import Task, distillation_loss


def distill(model: nn.Module, teacher: nn.Module, batches: Iterable[Any], config: DistillConfig | None = None, *,
            eval_batches: Iterable[Any] | None = None, device: str | torch.device | None = None,
            progress: bool = True, **settings) -> History:
    """Train `model` in place to reproduce `teacher`'s outputs on unlabeled `batches`.

    Args:
        model: the decomposed model (wrappers are looked through).
        teacher: the original model; never updated (moved to the device, eval mode).
        batches: unlabeled batches, each called as model(tensor), model(*tuple) or
            model(**dict) (read once into memory: an epoch reorders them).
        config: a DistillConfig; keyword `settings` override its fields (lr=..., max_steps=...).
        eval_batches: held-out batches, scored after each epoch: the distillation loss and the
            agreement with the teacher (top-1 for logits, mean embedding cosine for token states).
        device: default: this process's CUDA device if there is one, else CPU.
        progress: tqdm bars (rank 0 only).

    Returns:
        History: per finished epoch, the train loss, the evaluation loss and agreement
        (`test_agreement`), times and trainable shares. The model and the teacher are left in
        the training modes they came in (module by module), on `device`.

    Raises:
        ValueError: a bad setting, no batches, no teacher or the model itself as teacher, a
            model or teacher on the meta device, an output the loss cannot read, a loss that
            turns NaN, a checkpoint of another run.
        FileNotFoundError: resume=True without a checkpoint.
    """
    config = resolve(DistillConfig, config, settings, "distill")
    if teacher is None or unwrap(teacher) is unwrap(model):
        raise ValueError("distill needs the original model as teacher, a separate copy: "
                         "teacher = copy.deepcopy(model) before decomposing it")
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be an iterable of batches (a list or DataLoader), got a single "
                         f"{type(batches).__name__}: wrap one batch in a list")
    batches = list(batches)
    if not batches:
        raise ValueError("distill: no batches")
    held_out = None if eval_batches is None else list(eval_batches)
    model = unwrap(model)
    for role, net in (("model", model), ("teacher", unwrap(teacher))):
        check_real_weights(net, f"distill: the {role}")
    frozen = [] if config.train_embeddings else [
        m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    task = _Distillation(batches, held_out, teacher, model, config)
    with process_group(), kept_modes(model), kept_modes(unwrap(teacher)):
        try:
            for weight in frozen:
                weight.requires_grad_(False)
            return Run(model, task, config, device, progress).run()
        finally:
            task.close()
            for weight in frozen:
                weight.requires_grad_(True)


class _Distillation(Task):
    """Unlabeled batches; the loss compares the model's output with the teacher's."""

    verb = "distill"
    score = "test_agreement"

    def __init__(self, batches: list, eval_batches: list | None, teacher: nn.Module, model: nn.Module,
                 config: DistillConfig):
        self.batches, self.eval_batches, self.teacher, self.config = batches, eval_batches, teacher, config
        self.size, self.items_per_step = len(batches), 1
        self.matched: dict[str, dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self.handles = []
        if config.match_layers is not None:
            pattern = re.compile(config.match_layers)
            student_modules = dict(model.named_modules())
            names = [name for name, _ in unwrap(teacher).named_modules()
                     if name and pattern.fullmatch(name) and name in student_modules]
            if not names:
                raise ValueError(f"match_layers: regex {config.match_layers!r} matches no module the model and the "
                                 f"teacher both have")
            for role, net in (("teacher", unwrap(teacher)), ("student", model)):
                for name in names:
                    self.handles.append(net.get_submodule(name).register_forward_hook(self._keeper(role, name)))

    def _keeper(self, role: str, name: str):
        def hook(_module, _args, output):
            self.matched[role][name] = output_tensor(output)

        return hook

    def train_mode(self, model: nn.Module) -> None:
        """Eval mode unless asked otherwise: the model learns the function it will serve."""
        model.train(not self.config.eval_mode)

    def close(self) -> None:
        """Remove the hooks on the model and the teacher."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def fetch(self, indices: list[int], device: torch.device) -> Any:
        return move_inputs(self.batches[indices[0]], device)

    def _outputs(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        for kept in self.matched.values():
            kept.clear()
        with torch.no_grad():
            target = output_tensor(call_model(self.teacher, batch)).float()
        return output_tensor(call_model(net, batch)).float(), target

    def _loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        mask = token_mask(batch)
        loss = distill_loss(student, teacher, self.config.loss, mask, self.config.temperature)
        layers = self.matched["teacher"]
        if layers:
            loss = loss + sum(distill_loss(self.matched["student"][name].float(), target.float(), "mse", mask)
                              for name, target in layers.items()) / len(layers)
        return loss

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        student, teacher = self._outputs(net, batch)
        return self._loss(student, teacher, batch), student.shape[0]

    @property
    def has_evaluation(self) -> bool:
        return bool(self.eval_batches)

    def evaluate(self, model: nn.Module, device: torch.device, rank: int, world: int) -> tuple[float, float, int]:
        loss_sum, score_sum, n = 0.0, 0.0, 0
        for batch in self.eval_batches[rank::world]:
            batch = move_inputs(batch, device)
            student, teacher = self._outputs(model, batch)
            count = student.shape[0]
            loss_sum += self._loss(student, teacher, batch).item() * count
            score_sum += float(agreement(student, teacher, self.config.loss, token_mask(batch)).sum())
            n += count
        return loss_sum, score_sum, n

    def describe(self) -> dict:
        return {"teacher": True, "batches": len(self.batches)}


def pooled(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token states [batch, tokens, width] averaged over the real tokens (all where no mask);
    anything else is taken as one embedding per sample already."""
    if states.dim() != 3:
        return states.reshape(states.shape[0], -1)
    weights = torch.ones(states.shape[:2], device=states.device) if mask is None else mask.to(states.device)
    weights = weights.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1)


def resolve_loss(kind: str, output: torch.Tensor) -> str:
    """The loss "auto" means for this output: "kl" for logits [batch, classes], "cosine+mse" else."""
    if kind != "auto":
        return kind
    return "kl" if output.dim() == 2 else "cosine+mse"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, mask: torch.Tensor | None = None,
                 temperature: float = 2.0) -> torch.Tensor:
    """The distillation loss of `kind` (see the module docstring) between two outputs.

    Raises:
        ValueError: outputs of different shapes, or "kl" on something that is not logits.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"the model's output {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ")
    kind = resolve_loss(kind, student)
    if kind == "kl":
        if student.dim() != 2:
            raise ValueError(f"loss 'kl' compares logits [batch, classes], the model gave {tuple(student.shape)}: "
                             f"use 'cosine', 'mse' or 'cosine+mse'")
        return distillation_loss(student, teacher, temperature)
    loss = student.new_zeros(())
    if "cosine" in kind:
        loss = loss + (1 - F.cosine_similarity(pooled(student, mask), pooled(teacher, mask), dim=-1)).mean()
    if "mse" in kind:
        if mask is not None and student.dim() == 3 and tuple(student.shape[:2]) == tuple(mask.shape):
            keep = mask.to(student.device).bool()
            student, teacher = student[keep], teacher[keep]
        loss = loss + (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)
    return loss


@torch.no_grad()
def agreement(student: torch.Tensor, teacher: torch.Tensor, kind: str = "auto",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: where the loss `kind` compares logits, 1.0 if the top-1 classes agree; else the
    cosine of the embeddings."""
    if resolve_loss(kind, student) == "kl":
        return (student.argmax(-1) == teacher.argmax(-1)).float()
    return F.cosine_similarity(pooled(student, mask), pooled(teacher, mask), dim=-1)
