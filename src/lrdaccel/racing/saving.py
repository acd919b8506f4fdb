"""`race --save`: every trained variant kept under `OUT/models/<folder>/`, loadable as a user
would load it, with the classifier head (the whole classifier is saved, head included).

A variant's name (`lrd(ratio=1.5,freeze=static)`) holds characters a folder name should not, so
each folder is the name with every run of other characters than letters, digits, `.`, `-` and
`_` made one `_` (a number added where two names would meet); results.json's `saved` maps each
name to its folder, and each folder's `race_variant.json` names its variant, how to load it and
the accuracy the race measured.

- `original`, `lrd` and `lora` (served merged) variants: `tasks.saved.save_classifier` (`lrd.save`,
  for an undecomposed model an empty plan, plus classifier.json: the classes, the head, the zoo
  model, task and max_length where the race had them), the format `lrdaccel finetune --task`
  writes: loaded by `lrd.load(folder, starting_classifier)`, or from the zoo model alone by
  `tasks.saved.load_classifier` and `lrdaccel export --from folder --model <zoo name>`;
- `prune` variants: `peers.save_pruned`, loaded by `peers.load_pruned(folder, starting_classifier)`.

`load_variant(folder, start)` does either; `start` is the race's starting classifier (same
architecture, any weights).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from torch import nn

from lrdaccel._files import atomic_write
from lrdaccel.io import load
from lrdaccel.tasks.data import RaceData
from lrdaccel.tasks.saved import save_classifier

MODELS_DIR = "models"
VARIANT_FILE = "race_variant.json"


def folder_names(names: list[str]) -> dict[str, str]:
    """Variant name -> a folder name safe on every file system, unique among `names`."""
    folders: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "variant"
        folder, number = base, 2
        while folder in folders.values():
            folder, number = f"{base}_{number}", number + 1
        folders[name] = folder
    return folders


def save_variants(trained: dict[str, nn.Module], start: nn.Module, head: list[str], data: RaceData,
                  results: dict, out: Path) -> dict[str, str]:
    """Write each served model of `trained` (the last seed's) under out/models/; the mapping
    variant name -> folder (relative to `out`). `head`: the modules the race's classifier added."""
    rebuild = {"model": results.get("model"), "task": results.get("task"),
               "max_length": (results.get("data") or {}).get("max_length")}
    rows = {row["name"]: row for row in results["seeds"][-1]["variants"]}
    saved = {}
    for name, folder in folder_names(list(trained)).items():
        directory = out / MODELS_DIR / folder
        kind = rows[name]["kind"]
        if kind == "prune":
            from lrdaccel.peers import save_pruned

            save_pruned(trained[name], directory)
        else:
            save_classifier(trained[name], directory, classes=list(data.classes), head=list(head), **rebuild)
        record = {"variant": name, "kind": kind, "loader": "lrdaccel.peers.load_pruned" if kind == "prune" else
                  "lrdaccel.load", "seed": results["seeds"][-1]["seed"],
                  "final_accuracy": rows[name]["final_accuracy"], "eval_items": data.size("eval"),
                  "classes": list(data.classes), "model": results.get("model"),
                  "start_class": type(start).__name__}
        atomic_write(directory / VARIANT_FILE,
                     lambda tmp, record=record: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
        saved[name] = f"{MODELS_DIR}/{folder}"
    return saved


def load_variant(directory: str | Path, start: nn.Module) -> nn.Module:
    """The trained variant saved in `directory` (by `race(..., save=True)`), built on a copy of
    `start`, the race's starting classifier (not changed), in eval mode.

    Raises:
        FileNotFoundError: no race_variant.json there; ValueError: as lrd.load / load_pruned.
    """
    directory = Path(directory)
    path = directory / VARIANT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved race variant here (expected {VARIANT_FILE} from race --save)")
    record = json.loads(path.read_text())
    if record.get("kind") == "prune":
        from lrdaccel.peers import load_pruned

        return load_pruned(directory, start).eval()
    return load(directory, copy.deepcopy(start)).eval()
