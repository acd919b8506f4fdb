"""Saving a decomposed model from the GPU and loading it on the CPU, and back: the same tensors,
bitwise, on the device and in the dtype and memory format of the model loaded into.

safetensors reads onto the CPU; `lrd.load` then copies into the base model wherever it lives.
Each test runs on the CPU and, marked `cuda`, on a GPU where there is one.
"""

from __future__ import annotations

import pytest
import torch

import lrdaccel as lrd
from lrdaccel.layers.base import is_channels_last
from lrdaccel.layers.merged import MergedConv2d
from test_cuda_decompose import DEVICES, hf_resnet, placed


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _fresh(dtype: torch.dtype):
    torch.manual_seed(123)  # other weights than the saved model's, so a load that missed one shows
    model, _ = hf_resnet("cpu")
    return model.eval().to(dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_save_on_the_device_load_on_the_cpu_and_back(tmp_path, device, dtype):
    model, x = hf_resnet("cpu")
    model = model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    lrd.decompose(model, lrd.plan(model, ratio=2.0, merge=True, example_inputs=x), calibration=[x])
    saved = _state(model)
    lrd.save(model, tmp_path / "out")

    on_cpu = lrd.load(tmp_path / "out", _fresh(dtype))
    assert all(p.device.type == "cpu" and p.dtype == dtype for p in on_cpu.parameters())
    loaded = _state(on_cpu)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)

    back = lrd.load(tmp_path / "out", _fresh(dtype).to(device=device, memory_format=torch.channels_last))
    assert all(p.device.type == device and p.dtype == dtype for p in back.parameters())
    assert all(torch.equal(v, saved[k]) for k, v in _state(back).items())
    kxk = [m.weight for m in back.modules() if isinstance(m, MergedConv2d) and m.kernel_size != (1, 1)]
    assert kxk and all(is_channels_last(w) for w in kxk)  # the merged blocks' narrowed 3x3 convs
    with torch.no_grad():  # the same weights on the same device (kernels may pick other algorithms)
        torch.testing.assert_close(back(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_a_gpu_checkpoint_moves_with_the_model(tmp_path, device):
    """Loaded on the CPU, then moved: the model runs on the device as the saved one did."""
    model, x = placed("vit", device)
    lrd.decompose(model, lrd.plan(model, ratio=2.0))
    lrd.save(model, tmp_path / "vit")
    base, _ = placed("vit", "cpu")
    moved = lrd.load(tmp_path / "vit", base).to(device)
    with torch.no_grad():
        torch.testing.assert_close(moved(pixel_values=x).logits, model(pixel_values=x).logits, rtol=1e-5, atol=1e-5)
