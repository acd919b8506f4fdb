"""SequentialFreezingCallback in a real (tiny, CPU) Hugging Face Trainer run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

import lrdaccel as lrd  # noqa: E402
from lrdaccel.training.hf import SequentialFreezingCallback  # noqa: E402


class Images(torch.utils.data.Dataset):
    def __init__(self, n=24):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Watch(TrainerCallback):
    """Snapshots every parameter before each optimizer step and compares after it."""

    def __init__(self, freezing: SequentialFreezingCallback):
        self.freezing = freezing
        self.frozen_moved, self.moved, self.phases, self.frozen_counts = [], set(), [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # runs before the freezer's switch
        frozen = 0
        for name, p in model.named_parameters():
            value, trainable = self.before[name]
            changed = not torch.equal(p, value)
            frozen += not trainable
            if changed and not trainable:
                self.frozen_moved.append((state.global_step, name))
            if changed:
                self.moved.add(name)
        self.phases.append(self.freezing.freezer.phase)
        self.frozen_counts.append(frozen)


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config)
    lrd.decompose(model, ratio=2.0)
    return model


@pytest.mark.slow
def test_trainer_run_keeps_frozen_factors_bitwise(tmp_path):
    model = tiny_vit()
    factor_names = {f"{layer}.{n}" for layer, m in model.named_modules() if isinstance(m, lrd.LowRankModule)
                    for n, _ in m.named_parameters()}
    freezing = SequentialFreezingCallback(schedule="rotate", every_steps=2)
    watch = Watch(freezing)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6,
                             per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Images(), callbacks=[watch, freezing])
    trainer.train()
    assert watch.phases == [0, 0, 1, 1, 2, 2]
    assert all(count > 0 for count in watch.frozen_counts)
    assert watch.frozen_moved == []
    assert factor_names <= watch.moved  # every factor trained in some phase
    assert all(p.requires_grad for p in model.parameters())  # restored at on_train_end


def test_callback_follows_trainer_position_on_resume():
    model = tiny_vit()
    callback = SequentialFreezingCallback(every_steps=2)
    args = SimpleNamespace(world_size=1, ddp_find_unused_parameters=None)
    optimizer = torch.optim.AdamW(model.parameters())
    callback.on_train_begin(args, TrainerState(global_step=5, epoch=1.25), None, model=model, optimizer=optimizer)
    assert callback.freezer.phase == 2 and callback.freezer.global_step == 5
    by_epoch = SequentialFreezingCallback()
    by_epoch.on_train_begin(args, TrainerState(global_step=5, epoch=1.25), None, model=model, optimizer=optimizer)
    assert by_epoch.freezer.phase == 1
    by_epoch.on_epoch_begin(args, TrainerState(global_step=8, epoch=2.0), None)
    assert by_epoch.freezer.phase == 2


def test_callback_refuses_ddp_without_unused_parameter_search():
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        SequentialFreezingCallback().on_train_begin(args, TrainerState(), None, model=tiny_vit())


def test_callback_refuses_an_optimizer_without_later_factors():
    model = tiny_vit()
    frozen_early = lrd.SequentialFreezer(model)  # frozen before the optimizer was built: factors left out
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    frozen_early.restore()
    args = SimpleNamespace(world_size=1, ddp_find_unused_parameters=None)
    with pytest.raises(ValueError, match="lacks"):
        SequentialFreezingCallback().on_train_begin(args, TrainerState(), None, model=model, optimizer=optimizer)
