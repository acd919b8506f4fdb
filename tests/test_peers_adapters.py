"""peers.lora: adapters on the layers an LRD plan decomposes; only adapters and the head train
(every frozen weight bitwise unchanged after optimizer steps); merging gives the original
architecture with the same outputs."""

import pytest
import torch
from torch import nn

import lrdaccel as lrd
from lrdaccel import peers, zoo
from lrdaccel.measure.counting import count_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


class Classifier(nn.Module):
    """An encoder and a new head on its mask-averaged states: the head lies outside the encoder."""

    def __init__(self, encoder: nn.Module, width: int, classes: int = 3):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1))


def _tiny_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    return Classifier(transformers.BertModel(config), 64)


def _batch():
    ids = torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1, 2, 1])


def _train(model, batch, labels, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # over ALL parameters
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(**batch), labels).backward()
        optimizer.step()


def _only_adapters_and_head_move(model, batch, labels):
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, batch, labels)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not moved & set(frozen)  # every frozen weight bitwise unchanged
    assert all(".lora_" in n or ".head." in n for n in moved)
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)
    assert {n for n in moved if ".head." in n} == {n for n in start if ".head." in n}
    return moved


def test_lora_on_the_plans_linear_layers_trains_only_adapters_and_the_head():
    model = _tiny_classifier()
    plan = lrd.plan(model, ratio=2.0, exclude=["head"])
    tuned, report = peers.lora(model, plan, r=4, trainable=["head"])
    expected = [row.name for row in plan.layers if row.kind == "svd"]
    assert report.targets == expected and report.trainable_modules == ["head"]
    assert report.adapter_params == sum(4 * (m.in_features + m.out_features)
                                        for m in (model.get_submodule(n) for n in expected))
    assert report.trainable_params == report.adapter_params + count_params(model.head)
    assert report.total_params == count_params(model) + report.adapter_params
    assert "LoRA r=4 alpha=16" in str(report) and "trained in full: head" in str(report)
    batch, labels = _batch()
    _only_adapters_and_head_move(tuned, batch, labels)


def test_the_users_model_is_not_changed():
    model = _tiny_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tuned, _ = peers.lora(model, ["query", "value"], trainable=["head"])
    batch, labels = _batch()
    _train(tuned, batch, labels)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_merged_model_equals_the_unmerged_one_and_has_the_original_architecture():
    model = _tiny_classifier()
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # a user's own choice, kept
    tuned, _ = peers.lora(model, lrd.plan(model, ratio=2.0, exclude=["head"]), trainable="head")
    batch, labels = _batch()
    _train(tuned, batch, labels)
    tuned.eval()
    merged = peers.merge_lora(tuned)
    assert type(merged) is Classifier
    assert [type(m) for m in merged.modules()] == [type(m) for m in model.modules()]
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch), tuned(**batch), atol=1e-5, rtol=1e-5)
    assert not merged.encoder.embeddings.word_embeddings.weight.requires_grad
    assert merged.encoder.encoder.layer[0].attention.self.query.weight.requires_grad
    assert any("lora" in n for n, _ in tuned.named_parameters())  # merging left the LoRA model as it was


def test_a_fresh_lora_model_computes_what_the_original_does():
    model = _tiny_classifier().eval()
    tuned, _ = peers.lora(model, r"encoder\.encoder\.layer\.\d+\.(attention\.self\.\w+|intermediate\.dense)")
    batch, _ = _batch()
    with torch.no_grad():
        assert torch.equal(tuned.eval()(**batch), model(**batch))  # lora_B starts at zero


def test_hf_conv1d_targets_of_gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32,
                                                                 n_layer=1, n_head=2))
    plan = lrd.plan(model, ratio=2.0)
    tuned, report = peers.lora(model, plan, r=2)
    assert report.targets and all(model.get_submodule(n).__class__.__name__ == "Conv1D" for n in report.targets)
    ids = torch.randint(0, 50, (2, 6))
    optimizer = torch.optim.SGD(tuned.parameters(), lr=0.1)
    tuned.train()
    tuned(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tuned.eval()
    merged = peers.merge_lora(tuned)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_targets_inside_a_trainable_module_are_trained_in_full_instead():
    model = _tiny_classifier()
    tuned, report = peers.lora(model, lrd.plan(model, ratio=2.0), trainable=["pooler"])
    assert "encoder.pooler.dense" not in report.targets
    assert "inside a trainable module" in report.skipped["encoder.pooler.dense"]
    assert tuned.base_model.model.encoder.pooler.dense.weight.requires_grad


@pytest.mark.parametrize("settings, match", [({"r": 0}, "r must be"), ({"alpha": -1}, "alpha"),
                                             ({"dropout": 1.0}, "dropout"), ({"rank": 4}, "rank")])
def test_bad_settings_name_the_value(settings, match):
    with pytest.raises(ValueError, match=match):
        peers.lora(_tiny_classifier(), ["query"], **settings)


@pytest.mark.parametrize("targets, match", [(["no_such_layer"], "no_such_layer"), (None, "needs targets"),
                                            (["embeddings"], "targets")])
def test_bad_targets_are_refused(targets, match):
    with pytest.raises(ValueError, match=match):
        peers.lora(_tiny_classifier(), targets)


def test_a_plan_for_another_model_is_refused():
    plan = lrd.plan(zoo.get("fmnist-cnn").build(), ratio=2.0)
    with pytest.raises(ValueError, match="does not have"):
        peers.lora(_tiny_classifier(), plan)


def test_merge_lora_takes_only_a_lora_model():
    with pytest.raises(ValueError, match="merge_lora takes a model returned by lrdaccel.peers.lora"):
        peers.merge_lora(_tiny_classifier())


@pytest.mark.slow
def test_minilm_lora_trains_only_adapters_and_the_head_and_merges():
    model = Classifier(zoo.minilm(), 384, classes=4)
    tokens = zoo.minilm_tokenizer()(["a dog", "the river bank in spring", "an apple", "who wrote this sentence"],
                                    padding=True, return_tensors="pt")
    batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    labels = torch.tensor([0, 1, 2, 3])
    tuned, report = peers.lora(model, lrd.plan(model, ratio=2.0, exclude=["head"]), trainable=["head"])
    assert report.trainable_params < 0.02 * report.total_params
    _only_adapters_and_head_move(tuned, batch, labels)
    tuned.eval()
    with torch.no_grad():
        torch.testing.assert_close(peers.merge_lora(tuned)(**batch), tuned(**batch), atol=1e-5, rtol=1e-5)


class SmallCnn(nn.Module):
    """A stem, a strided 3x3 conv, a 1x1 conv, a depthwise conv (LRD and PEFT leave it) and a new head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.point = nn.Conv2d(32, 48, 1)
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        for layer in (self.stem, self.conv, self.point, self.depthwise):
            x = torch.relu(layer(x))
        return self.head(x.mean((2, 3)))


def test_lora_on_a_cnn_adapts_the_plans_ungrouped_convs_trains_only_them_and_merges_exactly():
    torch.manual_seed(0)
    model = SmallCnn()
    plan = lrd.plan(model, ratio=2.0, exclude=["head"])
    decomposed = {row.name for row in plan.layers if row.kind != "keep"}
    tuned, report = peers.lora(model, plan, r=4, trainable=["head"])
    assert {"conv", "point"} <= decomposed and "depthwise" not in decomposed
    assert report.targets == [name for name in ("stem", "conv", "point") if name in decomposed]
    shapes = {"stem": 4 * 3 * 9 + 32 * 4, "conv": 4 * 32 * 9 + 32 * 4, "point": 4 * 32 + 48 * 4}  # A: kxk to r, B: 1x1
    assert report.adapter_params == sum(shapes[name] for name in report.targets)
    x, labels = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    start = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(tuned(x), labels).backward()
        optimizer.step()
    moved = {n for n, p in tuned.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all(".lora_" in n or ".head." in n for n in moved)
    assert any(".lora_B." in n for n in moved)
    tuned.eval()
    merged = peers.merge_lora(tuned)
    assert [type(m) for m in merged.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tuned(x), atol=1e-5, rtol=1e-5)
