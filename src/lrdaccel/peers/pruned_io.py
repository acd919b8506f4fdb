"""Save and load a pruned model: its widths in JSON, its weights in safetensors, nothing pickled.

`lrd.save` / `lrd.load` rebuild low-rank structure from a plan and cannot describe a model whose
layers are narrower than its architecture says. A pruned model is saved as the width-describing
attributes of every layer (in/out channels, features, norm sizes, groups) and the head count of
every attention module; loading takes a fresh model of the same architecture, shrinks each layer
to the recorded widths, checks every tensor's name and shape against the file, then loads.

    peers.save_pruned(pruned, "pruned/")
    pruned = peers.load_pruned("pruned/", base_model)     # a new model; base_model is not changed
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from lrdaccel._files import check_header, check_model_class, check_output_dir, warn_unknown_fields
from lrdaccel._modules import unwrap
from lrdaccel._version import __version__
# one reader of safetensors files and one digest for every lrdaccel checkpoint
from lrdaccel.io import deduplicated_state, file_sha256, read_weights, write_checkpoint
from lrdaccel.peers.transformer_heads import set_heads

CONFIG_NAME = "pruned_config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_FORMAT = "lrdaccel.pruned"
CONFIG_VERSION = 1
CONFIG_FIELDS = {"format", "version", "lrdaccel_version", "model_class", "layers", "attention_heads", "aliases",
                 "weights_sha256"}

# the attributes that say how wide a layer is, per layer type (first match wins)
WIDTH_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.PReLU, ("num_parameters",)),
)


def _width_attrs(module: nn.Module) -> tuple[str, ...] | None:
    return next((attrs for kind, attrs in WIDTH_ATTRS if isinstance(module, kind)), None)


def describe_widths(model: nn.Module) -> tuple[dict, dict]:
    """(layer name -> {"type", width attributes}, attention module name -> head count)."""
    layers, heads = {}, {}
    for name, module in model.named_modules():
        attrs = _width_attrs(module)
        if attrs is not None:
            layers[name] = {"type": type(module).__name__,
                            **{a: list(v) if isinstance(v := getattr(module, a), tuple) else v for a in attrs}}
        count = getattr(module, "num_attention_heads", None)
        if isinstance(count, int) and not isinstance(count, bool) and not isinstance(module, nn.MultiheadAttention):
            heads[name] = count
    return layers, heads


def save_pruned(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `directory/pruned_config.json` (widths, heads, the weights' SHA-256) and
    `directory/model.safetensors`; both replace an old pair together (the old pair or the new one
    survives a crash). Tied tensors are stored once and re-tied on load.

    Raises:
        ValueError: `directory` is a file or lies under one.
    """
    model = unwrap(model)
    directory = Path(directory)
    check_output_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = deduplicated_state(model)
    layers, heads = describe_widths(model)
    config = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "lrdaccel_version": __version__,
              "model_class": type(model).__name__, "layers": layers, "attention_heads": heads, "aliases": aliases}

    write_checkpoint(tensors, directory / WEIGHTS_NAME, config, directory / CONFIG_NAME)


def load_pruned(directory: str | os.PathLike, base_model: nn.Module) -> nn.Module:
    """A copy of `base_model` (same architecture, unpruned) shrunk to the saved widths, with the
    saved weights. `base_model` is not changed.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: not a pruned-model directory of ours, a newer format, a weights file that is
            not the one the config was saved with, a `base_model` of another class than the saved
            one, or a checkpoint of another architecture (naming the layer or tensor that differs).
    """
    directory = Path(directory)
    config = _read_config(directory / CONFIG_NAME)
    tensors = read_weights(directory / WEIGHTS_NAME)
    if file_sha256(directory / WEIGHTS_NAME) != config.get("weights_sha256"):
        raise ValueError(f"{directory / WEIGHTS_NAME} is not the weights file {CONFIG_NAME} was saved with "
                         f"(SHA-256 differs); save the model again")
    for alias, target in config["aliases"].items():
        if target not in tensors:
            raise ValueError(f"{directory / CONFIG_NAME}: alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    check_model_class(config.get("model_class"), unwrap(base_model), str(directory / CONFIG_NAME))
    model = copy.deepcopy(unwrap(base_model))
    source = str(directory)
    _shrink_layers(model, config["layers"], source)
    _resize_tensors(model, tensors, source)
    for name, heads in config["attention_heads"].items():
        module = _module(model, name, source)
        if not hasattr(module, "num_attention_heads"):
            raise ValueError(f"{source}: {name!r} has no attention heads in this model (another architecture?)")
        set_heads(module, heads)
    model.load_state_dict(tensors, strict=True)
    _check_widths(model, config["layers"], source)
    return model


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pruned-model config here (expected {CONFIG_NAME} from save_pruned)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    check_header(config, CONFIG_FORMAT, CONFIG_VERSION, str(path), "pruned-model config")
    warn_unknown_fields(config, CONFIG_FIELDS, str(path), "pruned-model config")
    for field, kind in (("layers", dict), ("attention_heads", dict), ("aliases", dict), ("weights_sha256", str)):
        if not isinstance(config.get(field), kind):
            raise ValueError(f"{path}: field {field!r} must be a {kind.__name__}, got {config.get(field)!r}")
    return config


def _module(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: the model has no layer {name!r} (a checkpoint of another architecture?)") from None


def _shrink_layers(model: nn.Module, layers: dict, source: str) -> None:
    """Set each layer's recorded widths, after checking it is the same kind of layer."""
    for name, record in layers.items():
        module = _module(model, name, source)
        attrs = _width_attrs(module)
        if not isinstance(record, dict) or record.get("type") != type(module).__name__ or attrs is None:
            found = record.get("type") if isinstance(record, dict) else record
            raise ValueError(f"{source}: layer {name!r} is a {type(module).__name__} here but {found!r} in the file")
        for attr in attrs:
            value = record.get(attr)
            if isinstance(getattr(module, attr), tuple):
                value = tuple(value) if isinstance(value, list) else value
            if not isinstance(value, (int, tuple)) or isinstance(value, bool):
                raise ValueError(f"{source}: layer {name!r} field {attr!r} is {value!r}, not a width")
            setattr(module, attr, value)


def _resize_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Replace every parameter and buffer whose shape the file changes by an empty one of the
    file's shape (values come with load_state_dict); names must match exactly."""
    state = model.state_dict()
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or extra:
        raise ValueError(f"{source}: the file's tensors do not match the model's: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (a checkpoint of another architecture?)")
    for name, tensor in tensors.items():
        if tuple(state[name].shape) == tuple(tensor.shape):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        empty = torch.empty(tensor.shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(empty, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = empty


def _check_widths(model: nn.Module, layers: dict, source: str) -> None:
    """The recorded widths must agree with the weights (a hand-edited file would fail later)."""
    for name in layers:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        expected = None
        if isinstance(module, nn.Linear):
            expected = (module.out_features, module.in_features)
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            expected = (module.out_channels, module.in_channels // module.groups)
        elif isinstance(module, nn.Embedding):
            expected = (module.num_embeddings, module.embedding_dim)
        if isinstance(weight, torch.Tensor) and expected and tuple(weight.shape[:2]) != expected:
            raise ValueError(f"{source}: layer {name!r} records widths {expected} but its weight is "
                             f"{tuple(weight.shape)}")
