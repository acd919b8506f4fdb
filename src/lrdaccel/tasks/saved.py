"""A trained task classifier on disk, and back: the model (`lrd.save`: weights and plan, the
decomposition included) plus `classifier.json`, which says what the new head was made for.

A classifier is a zoo model with a head for a task's classes (lrdaccel.tasks.classifier), so its
weights alone do not say how to rebuild it: `load_classifier` builds the head again on the base
model (`make_classifier`, from the classes recorded here) and then `lrd.load` rebuilds the
decomposition and loads every weight, the head's included, checking names and shapes. A
directory without `classifier.json` is a plain `lrd.save` directory (`load_saved` loads either);
so is one whose `classifier.json` records other weights than the directory's (a plain model saved
there since).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from lrdaccel._files import check_header
from lrdaccel.io import CONFIG_NAME, load, read_config, save
from lrdaccel.tasks.classifier import make_classifier

CLASSIFIER_NAME = "classifier.json"
CLASSIFIER_FORMAT = "lrdaccel.classifier"
CLASSIFIER_VERSION = 1


def save_classifier(classifier: nn.Module, directory: str | os.PathLike, *, classes: list[str], head: list[str],
                    **describe: Any) -> None:
    """`lrd.save(classifier, directory)` and `directory/classifier.json` with the task's `classes`, the
    names of the modules `make_classifier` added (`head`), and `describe` (JSON values: the zoo
    model, the task, max_length, ...). Under torch.distributed only rank 0 writes (as lrd.save)."""
    save(classifier, directory)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    info = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "classes": list(classes),
            "head": list(head), **describe, "weights_sha256": read_config(directory)["weights_sha256"]}
    (Path(directory) / CLASSIFIER_NAME).write_text(json.dumps(info, indent=2) + "\n")


def read_classifier_info(directory: str | os.PathLike) -> dict | None:
    """`classifier.json` of a saved classifier, or None where the directory has none, or has one
    that an `lrd.save` since has made stale (its weights_sha256 is not the config's; warned).

    Raises:
        ValueError: the file is not ours (or newer than this lrdaccel reads), has no list of at
            least two classes, or a "head" that is not a list of module names.
    """
    path = Path(directory) / CLASSIFIER_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a classifier description ({error})") from None
    check_header(info, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, str(path), "classifier description")
    classes = info.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: \"classes\" must list at least two class names, got {classes!r}")
    head = info.get("head", [])
    if not isinstance(head, list) or not all(isinstance(name, str) for name in head):
        # the head is kept whole when the classifier is decomposed: a wrong list would decompose it
        raise ValueError(f"{path}: \"head\" must list module names, got {head!r}")
    weights = read_config(directory).get("weights_sha256")
    if info.get("weights_sha256", weights) != weights:
        warnings.warn(f"{path} describes an earlier save to {directory} (its weights_sha256 is not {CONFIG_NAME}'s): "
                      f"ignored, the directory holds a plain lrd.save model", stacklevel=2)
        return None
    return info


def load_classifier(directory: str | os.PathLike, base: nn.Module, example_inputs: Any) -> tuple[nn.Module, dict]:
    """(the classifier saved in `directory`, rebuilt on `base`, and its classifier.json).

    Args:
        base: the pretrained model the classifier was made from (e.g. zoo "minilm"'s `build()`).
        example_inputs: one batch the base model takes (to find where the head goes).

    Raises:
        ValueError: no classifier.json, or weights that do not fit (from `lrd.load`, naming them).
    """
    info = read_classifier_info(directory)
    if info is None:
        raise ValueError(f"{directory}: no {CLASSIFIER_NAME}: not a classifier saved by `lrdaccel finetune --task`")
    classifier, _ = make_classifier(base, example_inputs, len(info["classes"]))
    load(directory, classifier)
    return classifier, info


def load_saved(directory: str | os.PathLike, base: nn.Module, example_inputs: Any) -> nn.Module:
    """What `directory` holds, rebuilt on `base`: the saved classifier where it has
    classifier.json, else `lrd.load(directory, base)`."""
    if read_classifier_info(directory) is not None:
        return load_classifier(directory, base, example_inputs)[0]
    return load(directory, base)
