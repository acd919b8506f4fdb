"""The fine-tuning loop: history, freezing shares, distillation, AMP, exact resume, checkpoint checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.training.checkpoint import CHECKPOINT_NAME
from lrdaccel.training.loop import FinetuneConfig, finetune
from lrdaccel.training.task import distillation_loss as _distillation_loss


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train", limit=192), data.load("digits", "test", limit=96)


@pytest.fixture
def original():
    return small_cnn()


@pytest.fixture
def decomposed(original):
    model = copy.deepcopy(original)
    lrd.decompose(model, ratio=1.5, min_rank=1)  # the test CNN is narrower than the default min_rank
    return model


def _decomposed_at(ratio: float) -> nn.Module:
    model = small_cnn()
    lrd.decompose(model, ratio=ratio, min_rank=1)
    return model


def _shares(model, phases):
    out = []
    for phase in phases:
        freezer = lrd.SequentialFreezer(copy.deepcopy(model))
        freezer.set_epoch(phase)
        out.append(freezer.report().share)
    return out


def test_history_shares_and_learning(decomposed, digits):
    expected = _shares(decomposed, [0, 1, 2])
    history = finetune(decomposed, *digits, epochs=3, lr=0.05, batch_size=32, progress=False)
    assert history.completed and history.global_step == 18
    assert [r.epoch for r in history.epochs] == [0, 1, 2]
    assert [r.phases for r in history.epochs] == [[0], [1], [2]]
    assert [r.trainable_share for r in history.epochs] == pytest.approx(expected)
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    assert all(0 <= r.test_accuracy <= 1 and r.test_loss > 0 for r in history.epochs)
    assert all(p.requires_grad for p in decomposed.parameters())  # the freezer let go at the end
    assert "epoch" in str(history)


def test_no_freezing_trains_everything(decomposed, digits):
    history = finetune(decomposed, digits[0], None, epochs=1, schedule=None, batch_size=64, progress=False)
    assert history.epochs[0].trainable_share == 1.0 and history.epochs[0].test_accuracy is None


class WithBatchMethod(torch.utils.data.Dataset):
    """A dataset with a `batch(size)` method of its own, as a Hugging Face dataset has."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]

    def batch(self, batch_size, drop_last_batch=False):
        raise AssertionError("the loop called the dataset's own batch() as a batch fetcher")


def test_a_dataset_with_its_own_batch_method_is_read_item_by_item(original, digits):
    """Before, the loop called any `batch` method with a list of indices, taking it for lrdaccel.tasks'."""
    plain = finetune(copy.deepcopy(original), *digits, epochs=1, schedule=None, batch_size=32, progress=False)
    wrapped = finetune(copy.deepcopy(original), *(WithBatchMethod(d) for d in digits), epochs=1, schedule=None,
                       batch_size=32, progress=False)
    assert wrapped.epochs[0].train_loss == pytest.approx(plain.epochs[0].train_loss, rel=1e-6)
    assert wrapped.epochs[0].test_accuracy == plain.epochs[0].test_accuracy


def test_distillation_teacher_untouched(original, decomposed, digits):
    teacher_state = copy.deepcopy(original.state_dict())
    history = finetune(decomposed, *digits, teacher=original, alpha=0.7, temperature=2.0, epochs=1,
                       batch_size=64, optimizer="adamw", lr=1e-3, progress=False)
    assert math.isfinite(history.epochs[0].train_loss)
    for key, value in original.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_distillation_loss():
    logits = torch.randn(4, 10)
    assert _distillation_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 10)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student / 3, -1), torch.softmax(logits / 3, -1),
                                          reduction="batchmean") * 9
    assert _distillation_loss(student, logits, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_amp_on_cpu(decomposed, digits):
    history = finetune(decomposed, *digits, epochs=1, amp=True, batch_size=64, progress=False)
    assert math.isfinite(history.epochs[0].train_loss) and history.epochs[0].test_accuracy is not None


RESUME_CASES = {
    # every_steps=4 over 6 steps per epoch: phases switch mid-epoch; stop at step 9 is inside
    # epoch 1 (batch 3 of 6) and inside phase 2 (steps 8..11). AdamW, distillation, dropout.
    "adamw_every_steps_distill": (dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, every_steps=4), True, 9),
    # SGD with momentum, one phase per epoch, stop at step 8 (epoch 1, batch 2), freeze_one.
    "sgd_every_epoch": (dict(optimizer="sgd", lr=0.05, schedule="freeze_one"), False, 8),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_equals_uninterrupted_bitwise(case, original, decomposed, digits, tmp_path):
    settings, distill, stop = RESUME_CASES[case]
    settings = dict(settings, epochs=3, batch_size=32, seed=3)
    teacher = original if distill else None
    start = copy.deepcopy(decomposed)

    straight = copy.deepcopy(start)
    full = finetune(straight, *digits, teacher=teacher, checkpoint_dir=str(tmp_path / "a"), progress=False,
                    **settings)

    interrupted = copy.deepcopy(start)
    part = finetune(interrupted, *digits, teacher=teacher, checkpoint_dir=str(tmp_path / "b"), max_steps=stop,
                    progress=False, **settings)
    assert not part.completed and part.global_step == stop and len(part.epochs) == 1

    resumed_model = copy.deepcopy(start)  # the checkpoint replaces these weights
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = finetune(resumed_model, *digits, teacher=teacher, checkpoint_dir=str(tmp_path / "b"), resume=True,
                       progress=False, **settings)
    assert resumed.completed and resumed.global_step == full.global_step == 18
    reference = straight.state_dict()
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    strip = ("train_seconds", "eval_seconds")
    assert [{k: v for k, v in vars(r).items() if k not in strip} for r in resumed.epochs] == \
           [{k: v for k, v in vars(r).items() if k not in strip} for r in full.epochs]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [CHECKPOINT_NAME]  # no temporary left


def test_resume_refuses_another_run(decomposed, digits, tmp_path):
    finetune(copy.deepcopy(decomposed), *digits, epochs=2, batch_size=64, max_steps=2,
             checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="lr: saved 0.01, now 0.02"):
        finetune(copy.deepcopy(decomposed), *digits, epochs=2, batch_size=64, lr=0.02,
                 checkpoint_dir=str(tmp_path), resume=True, progress=False)
    with pytest.raises(ValueError, match="does not match the model"):
        finetune(_decomposed_at(3.0), *digits, epochs=2, batch_size=64,
                 checkpoint_dir=str(tmp_path), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune(copy.deepcopy(decomposed), *digits, checkpoint_dir=str(tmp_path / "none"), resume=True,
                 progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        finetune(copy.deepcopy(decomposed), *digits, checkpoint_dir=str(tmp_path / "junk"), resume=True,
                 progress=False)


def test_bad_settings(decomposed, digits):
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FinetuneConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule must be one of"):
        FinetuneConfig(schedule="sometimes")
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        FinetuneConfig(resume=True)
    with pytest.raises(ValueError, match=r"unknown finetune settings \['epoch'\]"):
        finetune(decomposed, *digits, epoch=3)


def test_meta_weights_are_refused_before_any_work():
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images = torch.randn(8, 1, 28, 28)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="finetune: 1.weight is on the meta device"):
        lrd.finetune(model, dataset, epochs=1, schedule=None)
