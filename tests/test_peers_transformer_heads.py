"""peers.prune on Hugging Face encoders: whole heads and MLP widths go, the residual stream stays,
the attention modules learn their new head counts, and the pruned model computes exactly what
the original computes with those heads and channels switched off."""

import copy

import pytest
import torch
from torch import nn

from lrdaccel import peers, zoo
from lrdaccel.measure.counting import count_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

SENTENCES = ["A dog.", "The quick brown fox jumps over the lazy dog near the river bank.",
             "Pruning removes whole attention heads.", "Short one", "Low-rank decomposition keeps every head "
             "but factorizes each projection into two thinner ones."]


def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def _tiny_batch():
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def minilm():
    return zoo.minilm().eval()


@pytest.fixture(scope="module")
def batch():
    return dict(zoo.minilm_tokenizer()(SENTENCES, padding=True, return_tensors="pt"))


def _rows(pruned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Which rows of `original` the pruned weight kept (torch-pruning copies them exactly)."""
    index = torch.cdist(pruned, original).argmin(1)
    assert torch.equal(original[index], pruned)
    return index


def _switched_off(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """The original with the pruned heads and MLP channels zeroed where the layer after reads them."""
    masked = copy.deepcopy(original)
    for layer, small in zip(masked.encoder.layer, pruned.encoder.layer):
        attention, small_attention = layer.attention.self, small.attention.self
        kept = [_rows(getattr(small_attention, p).weight, getattr(attention, p).weight)
                for p in ("query", "key", "value")]
        assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])  # the same heads everywhere
        size = attention.attention_head_size
        heads = kept[0].view(-1, size)
        assert torch.equal(heads, heads[:, :1] + torch.arange(size)) and (heads[:, 0] % size == 0).all()  # whole heads
        dropped = torch.ones(attention.all_head_size, dtype=torch.bool)
        dropped[kept[0]] = False
        with torch.no_grad():
            layer.attention.output.dense.weight[:, dropped] = 0
            channels = _rows(small.intermediate.dense.weight, layer.intermediate.dense.weight)
            off = torch.ones(layer.intermediate.dense.out_features, dtype=torch.bool)
            off[channels] = False
            layer.output.dense.weight[:, off] = 0
    return masked


def _check_pruned_encoder(original, pruned, report, batch):
    for name, (before, after) in report.heads.items():
        attention = pruned.get_submodule(name)
        assert attention.num_attention_heads == after < before
        assert attention.all_head_size == after * attention.attention_head_size == attention.query.out_features
    assert pruned.embeddings.word_embeddings.weight.shape == original.embeddings.word_embeddings.weight.shape
    assert pruned.pooler.dense.weight.shape == original.pooler.dense.weight.shape
    with torch.no_grad():
        got = pruned(**batch).last_hidden_state
        expected = _switched_off(original, pruned)(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_tiny_bert_heads_and_mlp_are_pruned_exactly():
    model, batch = _tiny_bert(), _tiny_batch()
    pruned, report = peers.prune(model, batch, pruning_ratio=0.5)
    assert set(report.heads.values()) == {(4, 2)}
    assert all(layer.intermediate.dense.out_features == 64 for layer in pruned.encoder.layer)
    assert any("residual stream" in reason for reason in report.kept.values())
    assert "pooler.dense" in report.kept
    _check_pruned_encoder(model, pruned, report, batch)


def test_tiny_bert_never_loses_its_last_head():
    model, batch = _tiny_bert(), _tiny_batch()
    pruned, report = peers.prune(model, batch, pruning_ratio=0.9)
    assert set(report.heads.values()) == {(4, 1)}
    pruned(**batch).last_hidden_state.sum().backward()


def test_vit_attention_with_renamed_projections():
    """transformers 5 names ViT's projections q_proj/k_proj/v_proj/o_proj: found by what they do."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, report = peers.prune(model, x, pruning_ratio=0.5)
    assert set(report.heads.values()) == {(4, 2)}
    for name in report.heads:
        attention = pruned.get_submodule(name)
        assert attention.q_proj.out_features == attention.v_proj.out_features == 2 * attention.head_dim
        assert attention.o_proj.out_features == 64
    assert pruned(pixel_values=x).logits.shape == (2, 3)


@pytest.mark.slow
def test_minilm_ratio_zero_is_the_original_bitwise(minilm, batch):
    pruned, report = peers.prune(minilm, batch, pruning_ratio=0.0)
    assert count_params(pruned) == count_params(minilm) and set(report.heads.values()) == {(12, 12)}
    with torch.no_grad():
        assert torch.equal(pruned(**batch).last_hidden_state, minilm(**batch).last_hidden_state)


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_minilm_within_two_percent_of_lrd_ratio_2(minilm, batch, importance):
    target = peers.lrd_params(minilm, 2.0)
    state = {k: v.clone() for k, v in minilm.state_dict().items()}
    extra = ({"loss_fn": lambda model: model(**batch).last_hidden_state.square().mean()}
             if importance == "taylor" else {})
    pruned, report = peers.prune(minilm, batch, target_params=target, importance=importance, **extra)
    assert abs(count_params(pruned) - target) <= 0.02 * target
    assert all(torch.equal(minilm.state_dict()[k], v) for k, v in state.items())
    _check_pruned_encoder(minilm, pruned, report, batch)


@pytest.mark.slow
def test_minilm_pruned_trains_with_masks_and_padding(minilm, batch):
    pruned, _ = peers.prune(minilm, batch, pruning_ratio=0.4)
    pruned.train()
    hidden = pruned(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ((hidden * mask).sum(1) / mask.sum(1)).square().mean().backward()
    trained = [n for n, p in pruned.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("attention.self.query" in n for n in trained) and any("intermediate" in n for n in trained)


# ---- attention forms this module refuses --------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, fused=False, kv_heads=4, head_size=True):
        super().__init__()
        self.num_attention_heads, self.num_key_value_heads = 4, kv_heads
        if head_size:
            self.head_dim = 4
        if fused:
            self.qkv = nn.Linear(16, 48)
        else:
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
        split = lambda t: t.view(*t.shape[:2], 4, 4).transpose(1, 2)  # noqa: E731
        out = torch.softmax(split(q) @ split(k).transpose(-1, -2), -1) @ split(v)
        return self.o(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("attention, match", [
    (_Attention(kv_heads=2), "grouped-query attention"), (_Attention(head_size=False), "no attention_head_size"),
    (_Attention(fused=True), "fused qkv")])
def test_attention_it_cannot_prune_is_named(attention, match):
    with pytest.raises(ValueError, match=match):
        peers.prune(nn.Sequential(nn.Linear(16, 16), attention), torch.randn(2, 3, 16), pruning_ratio=0.5)


def test_excluding_such_attention_keeps_its_heads():
    """Excluding keeps a layer's output width; this attention reshapes to its input's width, so the
    layer feeding it is excluded too."""
    model = nn.Sequential(nn.Linear(16, 16), _Attention(kv_heads=2), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    pruned, report = peers.prune(model, torch.randn(2, 3, 16), pruning_ratio=0.5, exclude=["0", "1"])
    assert pruned[1].q.out_features == 16 and pruned[2].out_features == 16 and not report.heads


def test_torch_transformer_with_its_attention_excluded_prunes_the_mlp_only():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2).eval()
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        peers.prune(model, x, pruning_ratio=0.5)
    pruned, report = peers.prune(model, x, pruning_ratio=0.5, exclude=nn.MultiheadAttention)
    assert [layer.linear1.out_features for layer in pruned.layers] == [32, 32]
    assert all(layer.linear2.out_features == 32 and layer.norm1.normalized_shape == (32,) for layer in pruned.layers)
    pruned.train()
    pruned(x).square().mean().backward()
