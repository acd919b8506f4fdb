"""calibration/statistics.py and decompose(method="whiten"): streamed statistics of the inputs each layer's
weight really multiplies, bounded memory, hooks and modes restored, atomic errors, save/load."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrdaccel as lrd
from lrdaccel.calibration.statistics import InputStats, collect_input_stats
from test_whiten import anisotropic_inputs


def images(n, channels=12, size=10, seed=0):
    """Images with strongly correlated channels (like real feature maps), spatially smooth."""
    rows = anisotropic_inputs(n * size * size, channels, decades=3, seed=seed, dtype=torch.float32)
    return F.avg_pool2d(rows.reshape(n, size, size, channels).movedim(-1, 1), 3, stride=1, padding=1)


class Net(nn.Module):
    """A strided, padded 1x1 conv, a 3x3 conv, batch norm, dropout and a Linear: every input rule."""

    def __init__(self, channels=12):
        super().__init__()
        self.pw = nn.Conv2d(channels, 32, 1, stride=2, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(32, 24)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.pw(x))))
        return self.fc(self.drop(x.mean((2, 3))))


def trained_net():
    """Batch-norm statistics of the data (a model that has seen it), then eval."""
    model = Net()
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(images(16, seed=seed))
    return model.eval()


def state(model):
    return copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]


def unchanged(model, snap):
    saved, types = snap
    now = model.state_dict()
    return saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved) and \
        types == [type(m) for m in model.modules()]


def hooks_of(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---- the statistics ----------------------------------------------------------------------------


def test_linear_stats_sum_every_token_over_every_batch():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(2, 7, 6) for _ in range(3)]
    stats = collect_input_stats(model, ["0", "2"], batches)
    tokens = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert stats["0"].count == 42 and stats["0"].sum_outer.dtype == torch.float64
    torch.testing.assert_close(stats["0"].sum_outer, tokens.T @ tokens)
    with torch.no_grad():
        hidden = torch.relu(model[0](torch.cat(batches).reshape(-1, 6))).double()
    torch.testing.assert_close(stats["2"].covariance(), hidden.T @ hidden / 42)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_pointwise_conv_stats_are_the_pixels_the_conv_reads(padding_mode):
    conv = nn.Conv2d(4, 6, 1, stride=2, padding=(1, 2), padding_mode=padding_mode)
    x = torch.randn(3, 4, 7, 6)
    stats = collect_input_stats(nn.Sequential(conv), ["0"], [x])
    mode = "constant" if padding_mode == "zeros" else padding_mode
    read = F.pad(x, (2, 2, 1, 1), mode=mode)[:, :, ::2, ::2]
    # The conv's own output agrees that these are the pixels it multiplied.
    torch.testing.assert_close(F.conv2d(read, conv.weight, conv.bias), conv(x))
    rows = read.movedim(1, -1).reshape(-1, 4).double()
    assert stats["0"].count == rows.shape[0]
    torch.testing.assert_close(stats["0"].sum_outer, rows.T @ rows)
    if padding_mode == "zeros":  # an independent route: unfold with the conv's geometry
        patches = F.unfold(x, 1, padding=(1, 2), stride=2).movedim(1, -1).reshape(-1, 4).double()
        torch.testing.assert_close(stats["0"].sum_outer, patches.T @ patches)


def test_kxk_conv_stats_are_every_input_pixel():
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 5, 6, 6)
    stats = collect_input_stats(nn.Sequential(conv), ["0"], [x, (x,)])
    rows = x.movedim(1, -1).reshape(-1, 5).double()
    assert stats["0"].count == 2 * 72
    torch.testing.assert_close(stats["0"].sum_outer, 2 * rows.T @ rows)


def test_hf_conv1d_stats_and_full_rank_whitened_layer_is_exact():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(10, 8)).double().eval()  # nf=10 out, nx=8 in
    x = anisotropic_inputs(64, 8, decades=4).reshape(4, 16, 8)
    stats = collect_input_stats(model, ["0"], [x])
    torch.testing.assert_close(stats["0"].sum_outer, x.reshape(-1, 8).T @ x.reshape(-1, 8))
    layer = lrd.SVDLinear.from_dense(model[0], 8, "0", input_covariance=stats["0"].covariance())
    assert isinstance(layer, lrd.SVDLinear) and layer.source == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model(x), rtol=1e-10, atol=1e-10)


def test_memory_stays_bounded_and_no_batch_is_kept():
    """Accumulators are d x d per layer whatever the number of batches; every batch is released."""
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    alive = []

    def stream(n):
        for _ in range(n):
            batch = torch.randn(32, 16)
            alive.append(weakref.ref(batch))
            yield batch

    def footprint(stats):
        return {name: (item.sum_outer.untyped_storage().nbytes(), [k for k, v in vars(item).items()
                                                                   if isinstance(v, torch.Tensor)])
                for name, item in stats.items()}

    one = collect_input_stats(model, ["0", "1"], stream(1))
    many = collect_input_stats(model, ["0", "1"], stream(200))
    assert many["0"].count == 200 * 32
    expected = {"0": (16 * 16 * 8, ["sum_outer", "sum_rows"]), "1": (8 * 8 * 8, ["sum_outer", "sum_rows"])}
    assert footprint(one) == footprint(many) == expected
    gc.collect()
    assert len(alive) == 201 and all(ref() is None for ref in alive)


def test_accumulation_chunks_large_batches_exactly(monkeypatch):
    import lrdaccel.calibration.statistics as statistics

    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", 30)  # 5 rows of 6 at a time
    stats = InputStats()
    rows = torch.randn(23, 6)
    stats.add(rows)
    torch.testing.assert_close(stats.sum_outer, rows.double().T @ rows.double())
    assert stats.count == 23


# ---- hooks, modes, errors ----------------------------------------------------------------------


def test_modes_restored_per_module_and_hooks_removed():
    model = trained_net()
    model.train()
    model.bn.eval()  # a frozen batch norm inside a training model: a mix to restore exactly
    seen = []
    model.drop.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    before = state(model)
    collect_input_stats(model, ["pw", "conv", "fc"], [images(4)])
    assert seen == [False]  # calibration ran in eval mode (no dropout, running BN statistics)
    assert model.training and model.drop.training and not model.bn.training
    assert hooks_of(model) == 1 and unchanged(model, before)  # BN running stats not updated either


def test_a_batch_the_model_fails_on_is_a_value_error_naming_it_and_cleans_up():
    model = trained_net()
    model.train()
    with pytest.raises(ValueError, match=r"calibration batch 1: .*drop labels"):
        collect_input_stats(model, ["pw", "fc"], [images(2), (images(2), torch.tensor([1, 2]))])
    assert hooks_of(model) == 0 and model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("calibration, message", [
    ([], "no batches"),
    (torch.randn(2, 12, 10, 10), "single Tensor"),
    ({"x": torch.randn(2, 12, 10, 10)}, "single dict"),
    (None, "required"),
    (3, "single int"),
])
def test_bad_calibration_containers(calibration, message):
    with pytest.raises(ValueError, match=message):
        collect_input_stats(trained_net(), ["fc"], calibration)


def test_nan_inputs_name_the_layer():
    x = images(2)
    x[0, 0, 1, 1] = float("nan")  # a pixel the strided 1x1 conv reads
    with pytest.raises(ValueError, match="layer 'pw'.*NaN"):
        collect_input_stats(trained_net(), ["pw"], [x])


def test_unknown_or_unsupported_layer_names():
    with pytest.raises(ValueError, match="layer 'nope'"):
        collect_input_stats(trained_net(), ["nope"], [images(2)])
    with pytest.raises(ValueError, match="layer 'bn'.*BatchNorm2d"):
        collect_input_stats(trained_net(), ["bn"], [images(2)])


def test_batch_forms_tuple_dict_and_dataloader_are_called_right():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, mask=None):
            return self.fc(x if mask is None else x * mask)

    model = Masked()
    x = torch.randn(3, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(3, 4)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=2)  # yields [tensor] lists: model(*batch)
    stats = collect_input_stats(model, ["fc"], [{"x": x, "mask": mask}, (x, mask)])
    masked = (x * mask).double()
    torch.testing.assert_close(stats["fc"].sum_outer, 2 * masked.T @ masked)
    stats = collect_input_stats(model, ["fc"], loader)
    torch.testing.assert_close(stats["fc"].sum_outer, x.double().T @ x.double())


# ---- layers and fallbacks ----------------------------------------------------------------------


def test_layer_never_reached_falls_back_to_plain_with_a_warning():
    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.body(x)

    model = WithUnusedHead()
    expected = lrd.SVDLinear.from_dense(model.head, 2).to_dense().weight
    with pytest.warns(UserWarning, match=r"layer 'head': no calibration input reached it; using plain SVD"):
        lrd.decompose(model, lrd.plan(model, ranks={"body": 2, "head": 2}), calibration=[torch.randn(4, 8)],
                      method="whiten")
    torch.testing.assert_close(model.head.to_dense().weight, expected)


def test_all_zero_inputs_fall_back_to_plain_tucker_with_a_warning():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    stats = collect_input_stats(nn.Sequential(conv), ["0"], [torch.zeros(2, 4, 5, 5)])
    with pytest.warns(UserWarning, match=r"layer 'blk.conv': .*zero.*plain Tucker-2 \(HOOI\)"):
        layer = lrd.TuckerConv2d.from_dense(conv, (2, 3), "blk.conv", input_covariance=stats["0"].covariance())
    expected = lrd.TuckerConv2d.from_dense(conv, (2, 3))
    torch.testing.assert_close(layer.to_dense().weight, expected.to_dense().weight)


def test_no_damping_and_a_dead_channel_falls_back_instead_of_failing():
    model = nn.Sequential(nn.Linear(5, 5))
    x = torch.randn(20, 5)
    x[:, 2] = 0
    with pytest.warns(UserWarning, match="layer '0': damped input covariance is not positive definite"):
        lrd.decompose(model, lrd.plan(model, ranks={"0": 2}), method="whiten", calibration=[x], damping=0.0)
    assert model[0].rank == 2
    with pytest.raises(ValueError, match="damping"):
        lrd.decompose(nn.Sequential(nn.Linear(5, 5)), ranks={"0": 2}, method="whiten", calibration=[x], damping=-1.0)


# ---- decompose(method="whiten") ----------------------------------------------------------------


def output_error(model, reference, x):
    with torch.no_grad():
        y = model(x)
    return ((y - reference).norm() / reference.norm()).item()


def test_whitened_model_has_lower_output_error_same_structure_and_ranks():
    base = trained_net()
    calibration, held_out = [images(16, seed=s) for s in range(10, 14)], images(32, seed=99)
    with torch.no_grad():
        reference = base(held_out)
    plan = lrd.plan(base, ratio=2.5, min_rank=1)  # every layer, small ones too
    plain, whitened = copy.deepcopy(base), copy.deepcopy(base)
    lrd.decompose(plain, plan)
    report = lrd.decompose(whitened, plan, calibration=calibration, method="whiten")
    structure = [(n, type(m).__name__, getattr(m, "rank", None)) for n, m in plain.named_modules()]
    assert structure == [(n, type(m).__name__, getattr(m, "rank", None)) for n, m in whitened.named_modules()]
    assert {r.name for r in report.layers} == {"pw", "conv", "fc"}
    assert output_error(whitened, reference, held_out) < output_error(plain, reference, held_out)
    # Parameter counts are identical: whitening changes values, never shapes.
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in whitened.parameters())
    assert not whitened.training and hooks_of(whitened) == 0


def test_full_rank_whitened_model_is_exact():
    model = trained_net().double()
    x = images(4, seed=7).double()
    with torch.no_grad():
        expected = model(x)
    lrd.decompose(model, lrd.plan(model, ranks="full"), calibration=[x], method="whiten")
    assert isinstance(model.conv, lrd.TuckerConv2d) and isinstance(model.pw, lrd.SVDConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_save_and_load_of_a_whitened_model(tmp_path):
    model = trained_net()
    lrd.decompose(model, ratio=2.0, min_rank=1, calibration=[images(8)], method="whiten")
    x = images(4, seed=3)
    with torch.no_grad():
        expected = model(x)
    lrd.save(model, tmp_path)
    loaded = lrd.load(tmp_path, Net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_whitened_layers_train_like_plain_ones():
    """Factors are ordinary parameters: one SGD step moves them and the loss is finite."""
    model = trained_net()
    lrd.decompose(model, ratio=2.0, min_rank=1, calibration=[images(8)], method="whiten")
    model.train()
    before = model.conv.core.weight.detach().clone()
    loss = model(images(4)).square().mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and not torch.equal(before, model.conv.core.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="bogus", calibration=[None]), "method must be one of \\('svd', 'whiten'\\), got 'bogus'"),
    (dict(method="whiten"), "needs calibration"),
    (dict(calibration=[torch.zeros(1)]), "only used by method='whiten'"),
    (dict(method="whiten", calibration=[images(2)], factorizer=lambda d, r: None), "unknown .*factorizer"),
    (dict(method="whiten", calibration=[]), "no batches"),
    (dict(method="whiten", calibration=images(2)), "single Tensor"),
    (dict(method="whiten", calibration=[images(2), torch.randn(2, 3)]), "calibration batch 1"),
    (dict(method="whiten", calibration=[torch.full((2, 12, 10, 10), float("nan"))]), "layer 'pw'.*NaN"),
])
def test_decompose_whiten_bad_inputs_leave_the_model_unchanged(kwargs, message):
    model = trained_net()
    model.train()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        lrd.decompose(model, ratio=2.0, min_rank=1, **kwargs)
    assert unchanged(model, before) and hooks_of(model) == 0 and all(m.training for m in model.modules())


def test_decompose_whiten_checks_the_plan_before_calibrating():
    model = trained_net()
    other = lrd.plan(nn.Sequential(nn.Linear(3, 3)), ranks={"0": 1})
    calls = []

    def batches():
        calls.append(1)
        yield images(2)

    with pytest.raises(ValueError, match="plan row '0'"):
        lrd.decompose(model, other, calibration=batches(), method="whiten")
    assert calls == []
