"""decomposition/sequential.py: layers decomposed in execution order, each fitted to the inputs the partly
decomposed model feeds it, the last factor re-solved in closed form; exact at full rank; every
error leaves the model as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrdaccel as lrd
from lrdaccel.calibration.passes import probe_calls
from lrdaccel.calibration.statistics import collect_input_stats
from lrdaccel.factorize.whiten import whitened_svd_split
from lrdaccel.decomposition.sequential import build_sequential
from test_whiten import anisotropic_inputs


def decompose_sequential(model, plan, batches, **settings):
    return lrd.decompose(model, plan, method="whiten", sequential=True, calibration=batches, **settings)


class TwoLinear(nn.Module):
    """fc1 then fc2: once fc1 is decomposed, fc2 sees inputs the original never fed it."""

    def __init__(self, d=24, hidden=20, out=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TwoConv(nn.Module):
    """Two 3x3 convs (Tucker-2 both): the second's last 1x1 is re-solved against the original."""

    def __init__(self, channels=10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 14, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def linear_batches(n=4, d=24, seed=0):
    return list(anisotropic_inputs(n * 64, d, decades=2, seed=seed).reshape(n, 64, d))


def image_batches(n=3, channels=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.avg_pool2d(torch.randn(4, channels, 9, 9, generator=g, dtype=torch.float64), 3, 1, 1) for _ in range(n)]


def snapshot(model):
    return copy.deepcopy(model.state_dict()), [(n, type(m)) for n, m in model.named_modules()], \
        [m.training for m in model.modules()]


def unchanged(model, snap):
    state, types, modes = snap
    now = model.state_dict()
    return (state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
            and types == [(n, type(m)) for n, m in model.named_modules()]
            and modes == [m.training for m in model.modules()]
            and sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0)


def inputs_of(model, name, batches):
    """The rows a layer of `model` receives on `batches`."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return rows


def with_bias_column(rows):
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)


# ---- the closed-form step against answers computed independently ---------------------------------


def test_last_factor_is_the_least_squares_optimum_and_strictly_reduces_the_error():
    """fc2's first factor is the whitened SVD's for the inputs the decomposed fc1 feeds it; its
    last factor and bias are then exactly the least-squares regression of the ORIGINAL fc2 output
    (on the original inputs) on what that first factor makes of the actual inputs (lstsq on the
    rows), and that error is strictly below the one of the whitened SVD's own last factor."""
    original = TwoLinear().double().eval()
    batches = linear_batches()
    model = copy.deepcopy(original)
    decompose_sequential(model, lrd.plan(original, ranks={"fc1": 6, "fc2": 5}), batches, refit="last",
                         refit_damping=0.0)
    x = torch.cat([b.reshape(-1, 24) for b in batches])
    with torch.no_grad():
        target = original.fc2(torch.tanh(original.fc1(x)))  # the original layer on the original inputs
        x_hat = torch.tanh(model.fc1(x))  # the layer's actual inputs in the decomposed model
        first, second = whitened_svd_split(original.fc2.weight, x_hat.T @ x_hat / x_hat.shape[0], 5)
        layer = model.fc2
        torch.testing.assert_close(layer.first.weight, first)
        solution = torch.linalg.lstsq(with_bias_column(x_hat @ first.T), target).solution
        torch.testing.assert_close(layer.second.weight, solution[:-1].T, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(layer.second.bias, solution[-1], rtol=1e-7, atol=1e-9)
        refitted = (layer(x_hat) - target).square().sum().item()
        whitened = (x_hat @ (second @ first).T + original.fc2.bias - target).square().sum().item()
    assert refitted < 0.9 * whitened, (refitted, whitened)


def test_whitening_uses_the_partly_decomposed_models_inputs():
    """With refit "none", fc2's factors are the whitened SVD for the covariance of the inputs the
    DECOMPOSED fc1 produces, not the original's."""
    original = TwoLinear().double().eval()
    batches = linear_batches()
    plan = lrd.plan(original, ranks={"fc1": 4, "fc2": 5})
    model = copy.deepcopy(original)
    decompose_sequential(model, plan, batches, refit="none")
    x_hat = torch.cat(inputs_of(model, "fc2", batches)).reshape(-1, 20)
    first, second = whitened_svd_split(original.fc2.weight.detach(), x_hat.T @ x_hat / x_hat.shape[0], 5)
    torch.testing.assert_close(model.fc2.first.weight, first)
    torch.testing.assert_close(model.fc2.second.weight, second)
    x = torch.cat(inputs_of(original, "fc2", batches)).reshape(-1, 20)
    stale, _ = whitened_svd_split(original.fc2.weight.detach(), x.T @ x / x.shape[0], 5)
    assert not torch.allclose(model.fc2.first.weight, stale, atol=1e-3)


def test_joint_refit_is_at_least_as_good_as_the_last_factor_alone():
    original = TwoLinear().double().eval()
    batches = linear_batches(seed=3)
    plan = lrd.plan(original, ranks={"fc1": 5, "fc2": 4})
    x = torch.cat([b.reshape(-1, 24) for b in batches])
    errors = {}
    for refit in ("none", "last", "joint"):
        model = copy.deepcopy(original)
        decompose_sequential(model, plan, batches, refit=refit, damping=0.0, refit_damping=0.0)
        with torch.no_grad():
            errors[refit] = (model(x) - original(x)).square().sum().item()
    assert errors["joint"] <= errors["last"] * (1 + 1e-9) and errors["last"] < errors["none"], errors


def test_tucker_last_factor_is_the_least_squares_optimum():
    original = TwoConv().double().eval()
    batches = image_batches()
    plan = lrd.plan(original, ranks={"conv1": (4, 4), "conv2": (5, 6)})
    models = {}
    for refit in ("none", "last"):
        models[refit] = copy.deepcopy(original)
        decompose_sequential(models[refit], plan, batches, refit=refit, refit_damping=0.0)
    x = torch.cat(batches)
    with torch.no_grad():
        target = original(x).movedim(1, -1).reshape(-1, 14)
        layer = models["last"].conv2
        z = layer.core(layer.first(torch.relu(models["last"].conv1(x)))).movedim(1, -1).reshape(-1, 6)
        solution = torch.linalg.lstsq(with_bias_column(z), target).solution
        torch.testing.assert_close(layer.last.weight[:, :, 0, 0], solution[:-1].T, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(layer.last.bias, solution[-1], rtol=1e-7, atol=1e-9)
        errors = {k: (m(x) - original(x)).square().sum().item() for k, m in models.items()}
    assert errors["last"] < errors["none"], errors


@pytest.mark.parametrize("refit", ["none", "last", "joint"])
def test_full_rank_sequential_decomposition_is_exact(refit):
    model = TwoConv().double().eval()
    head = nn.Sequential(model, nn.Flatten(), nn.Linear(14 * 81, 7).double()).eval()
    batches = image_batches(n=2)
    x = image_batches(n=1, seed=9)[0]
    with torch.no_grad():
        expected = head(x)
    report = decompose_sequential(head, lrd.plan(head, ranks="full"), batches, refit=refit)
    assert {r.name for r in report.layers} == {"0.conv1", "0.conv2", "2"}
    assert isinstance(head[0].conv2, lrd.TuckerConv2d) and isinstance(head[2], lrd.SVDLinear)
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected, rtol=1e-8, atol=1e-10)


def test_report_counts_and_structure_match_plain_decomposition():
    base = TwoConv().eval()
    batches = [b.float() for b in image_batches()]
    plan = lrd.plan(base, ratio=2.0, min_rank=1)
    plain, sequential = copy.deepcopy(base), copy.deepcopy(base)
    expected = lrd.decompose(plain, plan, example_inputs=batches[0])
    report = decompose_sequential(sequential, plan, batches, example_inputs=batches[0])
    assert [(n, type(m).__name__, getattr(m, "rank", None)) for n, m in plain.named_modules()] == \
        [(n, type(m).__name__, getattr(m, "rank", None)) for n, m in sequential.named_modules()]
    assert (report.model_params_before, report.model_params_after, report.model_macs_after) == \
        (expected.model_params_before, expected.model_params_after, expected.model_macs_after)
    assert [(r.name, r.rank, r.params_after) for r in report.layers] == \
        [(r.name, r.rank, r.params_after) for r in expected.layers]


def test_modes_of_the_new_layers_follow_the_replaced_ones():
    model = TwoLinear()
    model.train()
    model.fc2.eval()
    decompose_sequential(model, lrd.plan(model, ranks={"fc1": 3, "fc2": 3}), [b.float() for b in linear_batches()])
    assert model.training and model.fc1.training and all(m.training for m in model.fc1.modules())
    assert not model.fc2.training and not any(m.training for m in model.fc2.modules())


# ---- transformers: grouping and padding -------------------------------------------------------------


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config, add_pooling_layer=False).double().eval()


def padded_batch(lengths, seed=0, pad_noise=True):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, 50, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if pad_noise:
            ids[i, n:] = torch.randint(1, 50, (width - n,), generator=g)  # junk the mask hides
    return {"input_ids": ids, "attention_mask": mask}


def test_query_key_value_are_one_group_in_execution_order():
    model = tiny_bert()
    names = [row.name for row in lrd.plan(model, ratio=1.5, min_rank=1).decomposed]
    from lrdaccel.calibration.batches import layers_by_name

    order = probe_calls(model, layers_by_name(model, names), padded_batch([5, 3]))
    attention = "encoder.layer.0.attention"
    assert order.groups[0] == [f"{attention}.self.query", f"{attention}.self.key", f"{attention}.self.value"]
    assert order.groups[1] == [f"{attention}.output.dense"]
    assert sum(len(g) for g in order.groups) == len(names) and not order.unreached


def test_padded_tokens_do_not_enter_the_statistics():
    """One padded batch (junk ids under the mask) gives the same decomposition as the same
    sentences one per batch without padding: only real tokens are counted."""
    model = tiny_bert()
    padded = padded_batch([7, 3, 5])
    alone = [{k: v[i:i + 1, :n] for k, v in padded.items()} for i, n in enumerate([7, 3, 5])]
    stats_padded = collect_input_stats(model, ["encoder.layer.0.intermediate.dense"], [padded])
    stats_alone = collect_input_stats(model, ["encoder.layer.0.intermediate.dense"], alone)
    assert stats_padded["encoder.layer.0.intermediate.dense"].count == 15
    torch.testing.assert_close(stats_padded["encoder.layer.0.intermediate.dense"].sum_outer,
                               stats_alone["encoder.layer.0.intermediate.dense"].sum_outer)
    plan = lrd.plan(model, ratio=1.5, min_rank=1)
    assert len(plan.decomposed) == 12
    a, b = build_sequential(model, plan, [padded]), build_sequential(model, plan, alone)
    for name in a:
        torch.testing.assert_close(a[name].dense_weight(), b[name].dense_weight(), rtol=1e-6, atol=1e-8)


# ---- errors leave the model as it was ---------------------------------------------------------------


class Branchy(TwoLinear):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(16, 16)


@pytest.mark.parametrize("batches, settings, message", [
    ([], {}, "no batches"),
    (torch.randn(3, 24), {}, "single Tensor"),
    ([torch.randn(3, 24), torch.randn(3, 5)], {}, "calibration batch 1: the model failed"),
    ([torch.randn(3, 24), torch.full((3, 24), float("nan"))], {}, "calibration batch 1: NaN/Inf reached layer 'fc1'"),
    ([torch.randn(3, 24)], {"refit": "lstsq"}, "refit must be one of"),
    ([torch.randn(3, 24)], {"damping": -1.0}, "damping"),
])
def test_bad_calibration_or_settings_leave_the_model_unchanged(batches, settings, message):
    model = TwoLinear()
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        decompose_sequential(model, lrd.plan(model, ranks={"fc1": 3, "fc2": 3}), batches, **settings)
    assert unchanged(model, before)


def test_nan_reaching_a_later_layer_names_it():
    model = TwoLinear()
    x = torch.randn(3, 24)
    x[0, 0] = float("nan")  # fc1 is not planned: the first planned layer it reaches is fc2
    before = snapshot(model)
    with pytest.raises(ValueError, match="calibration batch 0: NaN/Inf reached layer 'fc2'"):
        decompose_sequential(model, lrd.plan(model, ranks={"fc2": 3}, include=["fc2"]), [x])
    assert unchanged(model, before)


def test_singular_statistics_without_damping_are_an_error_naming_the_layer():
    """Inputs confined to a subspace: with damping 0 there is no whitening factor (rank-deficient
    covariance); the default damping handles the same data."""
    model = TwoLinear()
    x = torch.randn(4, 64, 24)
    x[..., 5:] = 0  # rank 5 inputs for a 24-wide layer
    before = snapshot(model)
    plan = lrd.plan(model, ranks={"fc1": 3, "fc2": 3})
    with pytest.raises(ValueError, match="layer 'fc1': damped input covariance is not positive definite"):
        decompose_sequential(model, plan, [x], damping=0.0)
    assert unchanged(model, before)
    decompose_sequential(model, plan, [x])
    assert model.fc1.rank == 3


def test_singular_last_factor_system_without_damping_is_an_error():
    """The factor output z = A x_hat of a layer whose inputs are all zero but one direction:
    E[z z^T] is singular at rank 3, so the undamped least squares has no unique answer."""
    model = TwoLinear()
    x = torch.zeros(2, 16, 24)
    x[..., 0] = torch.randn(2, 16)
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer 'fc1': the least-squares system for the last factor is singular"):
        decompose_sequential(model, lrd.plan(model, ranks={"fc1": 3}, include=["fc1"]), [x], refit="last",
                             refit_damping=0.0)
    assert unchanged(model, before)


def test_a_layer_the_calibration_never_reaches_is_an_error():
    model = Branchy()
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer 'unused': the calibration forward never reaches it"):
        decompose_sequential(model, lrd.plan(model, ratio=2.0, min_rank=1), [torch.randn(3, 24)])
    assert unchanged(model, before)


def test_a_plan_for_another_model_is_refused_before_any_pass():
    model = TwoLinear()
    calls = []

    def batches():
        calls.append(1)
        yield torch.randn(2, 24)

    with pytest.raises(ValueError, match="plan row"):
        decompose_sequential(model, lrd.plan(nn.Sequential(nn.Linear(3, 3)), ranks={"0": 1}), batches())
    assert calls == []


@pytest.mark.parametrize("budget", [0, 100_000])
def test_keeping_the_original_inputs_or_not_gives_the_same_layers(budget, monkeypatch):
    """The original's input rows are kept for several groups up to a byte budget, else read batch
    by batch: the statistics, hence the factors, are the same to the bit."""
    import lrdaccel.decomposition.sequential as sequential

    model = TwoConv().double().eval()
    head = nn.Sequential(model, nn.Flatten(), nn.Linear(14 * 81, 7).double()).eval()
    batches = image_batches()
    plan = lrd.plan(head, ranks={"0.conv1": (3, 3), "0.conv2": (4, 4), "2": 3})
    expected = build_sequential(head, plan, batches)
    monkeypatch.setattr(sequential, "REFERENCE_CACHE_BYTES", budget)  # none kept / one conv group at a time
    built = build_sequential(head, plan, batches)
    for name, layer in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), built[name].state_dict().values()))


def test_sequential_goes_through_decompose_config_and_refuses_other_forms():
    with pytest.raises(ValueError, match="pass method='whiten'"):
        lrd.DecomposeConfig(sequential=True)
    with pytest.raises(ValueError, match="refit must be one of"):
        lrd.DecomposeConfig(method="whiten", sequential=True, refit="both")
    model = TwoConv()
    before = copy.deepcopy(model.state_dict())
    plan = lrd.plan(model, ratio=2.0, min_rank=1, branches=2)
    with pytest.raises(ValueError, match=r"sequential=True calibrates SVD and Tucker-2 rows.*tucker2_branched"):
        decompose_sequential(model, plan, [torch.randn(2, 10, 8, 8)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.conv1, nn.Conv2d)
