"""training/distill.py: unlabeled distillation towards the original, with freezing, resumable
bitwise like finetune; losses checked by hand; bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.training.checkpoint import CHECKPOINT_NAME
from lrdaccel.training.distill import agreement, distill, distill_loss, pooled
from lrdaccel.training.loop import finetune
from lrdaccel.training.task import distillation_loss
from test_training_loop import small_cnn


@pytest.fixture(scope="module")
def images():
    """Unlabeled batches of real digits (labels dropped), and held-out ones."""
    train, test = data.load("digits", "train", limit=192), data.load("digits", "test", limit=96)
    return list(train.tensors[0].split(32)), list(test.tensors[0].split(48))


@pytest.fixture
def pair():
    teacher = small_cnn()
    finetune(teacher, data.load("digits", "train", limit=192), None, epochs=2, lr=0.05, schedule=None,
             batch_size=32, progress=False)
    student = copy.deepcopy(teacher)
    lrd.decompose(student, ratio=2.0, min_rank=1)
    return teacher.eval(), student


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32), add_pooling_layer=False).eval()


def token_batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, 10, (4,), generator=g)
        mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": torch.randint(1, 60, (4, 10), generator=g) * mask, "attention_mask": mask})
    return out


def test_distillation_recovers_the_teacher_and_leaves_it_untouched(pair, images):
    teacher, student = pair
    teacher_state = copy.deepcopy(teacher.state_dict())
    history = distill(student, teacher, images[0], eval_batches=images[1], epochs=4, lr=3e-3, progress=False)
    records = history.epochs
    assert history.completed and len(records) == 4 and history.global_step == 24
    assert records[-1].test_loss < records[0].test_loss and records[-1].train_loss < records[0].train_loss
    assert 0 <= records[0].test_agreement <= records[-1].test_agreement <= 1 and records[-1].test_accuracy is None
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and "test agr" in str(history)


def test_embedding_distillation_freezes_embedding_tables_by_default_and_gives_them_back():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    lrd.decompose(student, ratio=1.5, min_rank=1)
    words = student.embeddings.word_embeddings.weight.detach().clone()
    history = distill(student, teacher, token_batches(), eval_batches=token_batches(2, seed=1), lr=1e-3,
                      progress=False)
    assert torch.equal(student.embeddings.word_embeddings.weight, words)  # not trained
    assert student.embeddings.word_embeddings.weight.requires_grad  # but trainable again after
    assert -1 <= history.epochs[0].test_agreement <= 1
    distill(student, teacher, token_batches(), lr=1e-3, train_embeddings=True, progress=False)
    assert not torch.equal(student.embeddings.word_embeddings.weight, words)


@pytest.mark.parametrize("case", ["rotate-kl", "tokens-cosine+mse"])
def test_resume_equals_uninterrupted_bitwise(case, pair, images, tmp_path):
    if case == "rotate-kl":
        teacher, student = pair
        batches, settings = images[0], dict(schedule="rotate", every_steps=4, lr=1e-3, epochs=2, warmup_steps=3)
    else:
        teacher = tiny_bert()
        student = copy.deepcopy(teacher)
        lrd.decompose(student, ratio=1.5, min_rank=1)
        batches, settings = token_batches(), dict(lr=1e-3, epochs=2, loss="cosine+mse", optimizer="adamw")
    interrupted = copy.deepcopy(student)
    full = distill(student, teacher, batches, progress=False, **settings)
    for stop in (5, 9, None):  # stopped twice, then run to the end
        history = distill(interrupted, teacher, batches, checkpoint_dir=str(tmp_path), resume=stop != 5,
                          max_steps=stop, progress=False, **settings)
    assert history.completed and history.global_step == full.global_step == 12
    for key, value in student.state_dict().items():
        assert torch.equal(value, interrupted.state_dict()[key]), key
    assert [r.train_loss for r in history.epochs] == [r.train_loss for r in full.epochs]


def test_resume_refuses_other_settings_other_data_and_a_finetune_checkpoint(pair, images, tmp_path):
    teacher, student = pair
    distill(copy.deepcopy(student), teacher, images[0], checkpoint_dir=str(tmp_path), max_steps=2, progress=False)
    with pytest.raises(ValueError, match="lr: saved 0.0001, now 0.001"):
        distill(copy.deepcopy(student), teacher, images[0], lr=1e-3, checkpoint_dir=str(tmp_path), resume=True,
                progress=False)
    with pytest.raises(ValueError, match="batches: saved 6, now 5"):
        distill(copy.deepcopy(student), teacher, images[0][:5], checkpoint_dir=str(tmp_path), resume=True,
                progress=False)
    with pytest.raises(ValueError, match="not an lrdaccel fine-tuning checkpoint"):
        finetune(copy.deepcopy(student), data.load("digits", "train", limit=64), None, checkpoint_dir=str(tmp_path),
                 resume=True, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).is_file()


@pytest.mark.parametrize("call, message", [
    (lambda s, t, b: distill(s, t, [], progress=False), "no batches"),
    (lambda s, t, b: distill(s, t, b[0][0], progress=False), "single Tensor"),
    (lambda s, t, b: distill(s, s, b[0], progress=False), "separate copy"),
    (lambda s, t, b: distill(s, None, b[0], progress=False), "separate copy"),
    (lambda s, t, b: distill(s, t, b[0], loss="l1", progress=False), "loss must be one of"),
    (lambda s, t, b: distill(s, t, b[0], warmup_steps=-1, progress=False), "warmup_steps"),
    (lambda s, t, b: distill(s, t, b[0], lr=1e6, optimizer="sgd", progress=False), "the loss is .* at step"),
    (lambda s, t, b: distill(s, t, b[0], resume=True, progress=False), "need checkpoint_dir"),
])
def test_bad_input(call, message, pair, images):
    teacher, student = pair
    with pytest.raises(ValueError, match=message):
        call(student, teacher, images)


def test_kl_on_token_states_is_refused():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="loss 'kl' compares logits"):
        distill(student, teacher, token_batches(1), loss="kl", progress=False)


# ---- the losses by hand -------------------------------------------------------------------------------


def test_losses_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    by_hand = []
    for i in range(3):
        n = int(mask[i].sum())
        by_hand.append(F.cosine_similarity(student[i, :n].mean(0), teacher[i, :n].mean(0), dim=0))
    torch.testing.assert_close(agreement(student, teacher, "cosine", mask), torch.stack(by_hand))
    torch.testing.assert_close(distill_loss(student, teacher, "cosine", mask), 1 - torch.stack(by_hand).mean())
    real = mask.bool()
    mse = (student[real] - teacher[real]).square().sum() / teacher[real].square().sum()
    torch.testing.assert_close(distill_loss(student, teacher, "mse", mask), mse)
    torch.testing.assert_close(distill_loss(student, teacher, "auto", mask), 1 - torch.stack(by_hand).mean() + mse)
    torch.testing.assert_close(pooled(student, None), student.mean(1))
    logits_s, logits_t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    torch.testing.assert_close(distill_loss(logits_s, logits_t, "auto", temperature=3.0),
                               distillation_loss(logits_s, logits_t, 3.0))
    assert agreement(logits_s, logits_s).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="differ"):
        distill_loss(logits_s, logits_t[:, :5], "kl")


def test_matched_layers_add_each_blocks_error_and_hooks_go_away():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    lrd.decompose(student, ratio=1.5, min_rank=1)
    batch = token_batches(1)
    plain = distill(copy.deepcopy(student), teacher, batch, lr=1e-9, progress=False, eval_batches=batch)
    matched = distill(student, teacher, batch, lr=1e-9, progress=False, eval_batches=batch,
                      match_layers=r"encoder\.layer\.\d+")
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))
    student.eval()
    with torch.no_grad():
        s_out = student(**batch[0], output_hidden_states=True)
        t_out = teacher(**batch[0], output_hidden_states=True)
    mask = batch[0]["attention_mask"]
    blocks = sum(distill_loss(s, t, "mse", mask) for s, t in zip(s_out.hidden_states[1:], t_out.hidden_states[1:])) / 2
    assert matched.epochs[0].test_loss == pytest.approx(plain.epochs[0].test_loss + blocks.item(), rel=1e-4)
    # Trained in eval mode (no dropout): the train loss is the evaluation loss on the same batch.
    assert matched.epochs[0].train_loss == pytest.approx(matched.epochs[0].test_loss, rel=1e-2)
    with pytest.raises(ValueError, match="matches no module"):
        distill(student, teacher, batch, match_layers="nothing", progress=False)
    with pytest.raises(ValueError, match="match_layers must be a regex"):
        distill(student, teacher, batch, match_layers="(", progress=False)


def test_the_student_and_the_teacher_keep_the_modes_they_came_in(pair, images):
    teacher, student = pair
    student.train()
    next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()  # a mixed state
    teacher.train()
    modes = {"student": [m.training for m in student.modules()], "teacher": [m.training for m in teacher.modules()]}
    distill(student, teacher, images[0][:2], epochs=1, progress=False)
    assert [m.training for m in student.modules()] == modes["student"]
    assert [m.training for m in teacher.modules()] == modes["teacher"]


def test_a_meta_model_or_teacher_is_refused_before_any_work(pair, images):
    teacher, student = pair
    with torch.device("meta"):
        meta = small_cnn()
    for model, other, role in ((meta, teacher, "model"), (student, meta, "teacher")):
        with pytest.raises(ValueError, match=f"distill: the {role}: .* is on the meta device"):
            distill(model, other, images[0], progress=False)
