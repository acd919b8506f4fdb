"""Save and load decomposed models: a JSON config (with the plan) and safetensors weights.

Loading rebuilds the decomposed structure on an undecomposed model of the same architecture
from the plan, checks every tensor name and shape against the file, and only then changes the
model. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lrdaccel._files import check_header, check_model_class, check_output_dir, replace_together, warn_unknown_fields
from lrdaccel._modules import unwrap
from lrdaccel._version import __version__
from lrdaccel.decomposition.merged_blocks import merged_rows
from lrdaccel.decomposition.narrow_build import narrow_config, narrowed_rows
from lrdaccel.layers import LowRankModule
from lrdaccel.layers.registry import dense_shape
from lrdaccel.planning import LayerPlan, Plan
from lrdaccel.planning.forms import apply_forms, forms_meta
from lrdaccel.decomposition.build import build_modules, swap_modules

CONFIG_NAME = "lrdaccel_config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_FORMAT = "lrdaccel.model"
CONFIG_VERSION = 1
CONFIG_FIELDS = {"format", "version", "lrdaccel_version", "model_class", "aliases", "plan", "weights_sha256"}


def plan_of(model: nn.Module) -> Plan:
    """The structural plan of a decomposed model, read off its low-rank modules and merged blocks."""
    model = unwrap(model)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankModule):
            dense = module.to_dense()
            stride = tuple(module.core.stride) if hasattr(module, "core") else (1, 1)
            rows.append(LayerPlan(name, module.kind, module.rank, "saved", _source_type(module),
                                  dense_shape(dense), stride, branches=getattr(module, "branches", 1)))
    rows += merged_rows(model) + narrowed_rows(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return Plan(sorted(rows, key=lambda row: order[row.name]), meta=forms_meta(model))


def _source_type(module: LowRankModule) -> str:
    return getattr(module, "source", None) or "Conv2d"


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def deduplicated_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the state dict's tensors on the CPU, each stored once; {tied name: the name it is stored
    under}): tied weights (an embedding read by the output layer) are one tensor, written once and
    re-tied on load."""
    tensors, aliases = {}, {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `directory/lrdaccel_config.json` and `directory/model.safetensors`.

    Tied tensors are stored once and re-tied on load. Both files are written in full under
    temporary names before either replaces an existing one, and a failure while replacing puts the
    old one back (`lrdaccel._files.replace_together`): overwriting a checkpoint leaves the old pair
    or the new pair, never a mix. The config records the weights' SHA-256, so a mixed pair left by
    a crash is refused on load with a clear error. Under torch.distributed only rank 0 writes.

    Raises:
        ValueError: `directory` exists and is not a directory, or lies under a file; the model is
            quantized (nothing is written: save the float model, quantize after loading).
    """
    if not _is_writer():
        return
    model = unwrap(model)
    check_plain_state(model)
    directory = Path(directory)
    check_output_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = deduplicated_state(model)
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "lrdaccel_version": __version__,
        "model_class": type(model).__name__,
        "aliases": aliases,
        "plan": plan_of(model).to_dict(),
    }

    write_checkpoint(tensors, directory / WEIGHTS_NAME, config, directory / CONFIG_NAME)


def check_plain_state(model: nn.Module) -> None:
    """Refuse a quantized model before anything is written: its int8 layers keep packed weights,
    scales and dtypes (`lrd.quantize`, torch.ao, torchao) that safetensors cannot hold and that
    `lrd.load` could not rebuild. Quantizing after loading gives the same model in a second."""
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, nn.Parameter) and not value.is_quantized:
            continue
        layer = name.split("._packed_params")[0] if "._packed_params" in name else name.rpartition(".")[0]
        kind = model.get_submodule(layer)._get_name()
        raise ValueError(f"lrd.save: layer {layer!r} is quantized ({kind}), which a checkpoint cannot hold; save the "
                         f"float model and quantize after lrd.load (lrd.quantize(model, 'int8'))")


def write_checkpoint(tensors: dict[str, torch.Tensor], weights_path: Path, config: dict, config_path: Path) -> None:
    """Writes the weights (safetensors) and the config (JSON, with the weights' SHA-256) as one
    pair: the old pair or the new one survives a failure, never a mix (`replace_together`)."""

    def write_weights(path: str) -> None:
        save_file(tensors, path, metadata={"format": "pt"})
        config["weights_sha256"] = file_sha256(Path(path))

    def write_config(path: str) -> None:
        Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    replace_together({weights_path: write_weights, config_path: write_config})


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no lrdaccel config here (expected {CONFIG_NAME} from lrdaccel.save)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    check_header(config, CONFIG_FORMAT, CONFIG_VERSION, str(path), "model config")
    warn_unknown_fields(config, CONFIG_FIELDS, str(path), "model config")
    aliases = config.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{path}: field 'aliases' must be an object of tensor name -> tensor name, got {aliases!r}")
    digest = config.get("weights_sha256")
    if digest is not None and not isinstance(digest, str):
        raise ValueError(f"{path}: field 'weights_sha256' must be a string, got {digest!r}")
    return config


def load(directory: str | os.PathLike, base_model: nn.Module, strict: bool = True) -> nn.Module:
    """Rebuild the saved decomposition on `base_model` (undecomposed, same architecture), load weights.

    Returns `base_model`, changed in place. On any mismatch (another model class than the saved
    one, tensors or layers that differ) it raises ValueError naming it and leaves `base_model` as
    it was. Config fields this version does not know are ignored with a warning.
    """
    directory = Path(directory)
    config = read_config(directory)
    plan = Plan.from_dict(config.get("plan"), source=str(directory / CONFIG_NAME))
    model = unwrap(base_model)
    check_model_class(config.get("model_class"), model, str(directory / CONFIG_NAME))
    built = build_modules(model, plan, factorize=False)
    tensors = read_weights(directory / WEIGHTS_NAME)
    for alias, target in (config.get("aliases") or {}).items():
        if target not in tensors:
            raise ValueError(f"{directory / CONFIG_NAME}: alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    expected = _expected_state(model, built)
    _check_tensors(directory / WEIGHTS_NAME, expected, tensors, strict)
    _check_pair(directory, config)
    originals = swap_modules(model, built)
    try:
        model.load_state_dict(tensors, strict=strict)
        apply_forms(model, plan)
        narrow_config(model, plan)
    except BaseException:
        swap_modules(model, originals)
        raise
    return base_model


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (recorded beside the weights, so that a mixed pair is refused on load)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_pair(directory: Path, config: dict) -> None:
    """The weights must be the ones the config was written with (a crash between the two files'
    replacement would leave a new file beside an old one)."""
    expected = config.get("weights_sha256")
    path = directory / WEIGHTS_NAME
    if expected is not None and path.is_file() and file_sha256(path) != expected:
        raise ValueError(f"{path} is not the weights file {directory / CONFIG_NAME} was saved with (SHA-256 "
                         f"differs): the directory holds parts of two saves; save the model again")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (nothing is unpickled).

    Raises:
        FileNotFoundError: no such file; ValueError: not safetensors.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def _expected_state(model: nn.Module, built: dict[str, nn.Module]) -> dict[str, tuple]:
    """Tensor name -> shape the model will have once `built` is swapped in."""
    replaced = tuple(name + "." for name in built)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for name, module in built.items():
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return expected


def _check_tensors(path: Path, expected: dict[str, tuple], tensors: dict[str, torch.Tensor], strict: bool) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
             for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
    problems = []
    if wrong:
        problems.append(f"shape mismatch: {wrong[:5]}" + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    if strict and missing:
        problems.append(f"missing from file: {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if strict and extra:
        problems.append(f"not in model: {extra[:5]}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems))
