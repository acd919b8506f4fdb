"""Labelled text tasks offline: WordNet noun supersenses, and a user's own JSONL file.

`wordnet-supersense`: every noun synset's gloss (its definition, the text before its first
quoted example) labelled by the synset's lexicographer file (noun.animal, noun.artifact, ...: 26
classes), read from Debian's `wordnet-base` (/usr/share/wordnet/data.noun). A text that occurs
with two labels is dropped (its label is not a function of the text), duplicates are kept once.
The 2,000 texts with the smallest SHA-1 of their normalised text are held out for evaluation:
stable across runs, machines and orders, and independent of anything else asked for.

A JSONL file: one object per line with "text" and "label" (any string, or a number, used as its
string) and optionally "split" ("train" or "eval"). Without "split", 1 text in 10 is held out by
a hash of its text, as lrdaccel.calibration.corpora splits its sentences.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lrdaccel.calibration.corpora import WORDNET_DIR

# WordNet's lexicographer files for nouns (lexnames 3-28; Debian's wordnet-base ships no lexnames file).
NOUN_LEXFILES = ("noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
                 "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
                 "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
                 "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
                 "noun.substance", "noun.time")
FIRST_NOUN_LEXFILE = 3
SUPERSENSE_EVAL_SIZE = 2000
JSONL_EVAL_BUCKETS = 10  # 1 in 10 held out where a file gives no split
SPLITS = ("train", "eval")


@dataclass
class TextSplits:
    """Texts and their label indices, per split; `classes[i]` names label i."""

    classes: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _digest(text: str) -> bytes:
    return hashlib.sha1(_normalised(text).lower().encode("utf-8")).digest()


def _definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: up to its first quoted example, without the
    separating semicolons."""
    return _normalised(gloss.split('"', 1)[0].strip().rstrip(";").strip())


def wordnet_supersense() -> TextSplits:
    """Noun glosses -> their lexicographer file (26 classes); see the module docstring.

    Raises:
        FileNotFoundError: wordnet-base is not installed (the message says how to install it).
    """
    path = WORDNET_DIR / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base "
                                f"(apt-get install wordnet-base) or set LRDACCEL_WORDNET")
    labels: dict[str, set[int]] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:  # the licence header
            continue
        fields = line.split(" ", 2)
        label = int(fields[1]) - FIRST_NOUN_LEXFILE
        text = _definition(line.split("|", 1)[1])
        if not text or not 0 <= label < len(NOUN_LEXFILES):
            continue
        labels.setdefault(text, set()).add(label)
    texts = sorted((text for text, found in labels.items() if len(found) == 1), key=_digest)
    held_out = set(texts[:SUPERSENSE_EVAL_SIZE])
    return _splits(list(NOUN_LEXFILES), [(t, next(iter(labels[t])), t in held_out) for t in texts])


def jsonl_task(path: str | Path) -> TextSplits:
    """A user's labelled texts; see the module docstring.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object with a non-empty "text" and a "label", a
            "split" other than train/eval, a split with no texts, or fewer than two labels; the
            message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    rows: list[tuple[str, str, bool]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object with \"text\" and \"label\", got {type(item).__name__}")
            text, label = item.get("text"), item.get("label")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: no \"text\" (a non-empty string) in {_preview(item)}")
            if label is None or isinstance(label, (bool, dict, list)) or (isinstance(label, str) and not label):
                raise ValueError(f"{where}: no \"label\" (a string or a number) in {_preview(item)}")
            split = item.get("split")
            if split is None:
                held_out = _digest(text)[0] % JSONL_EVAL_BUCKETS == 0
            elif split in SPLITS:
                held_out = split == "eval"
            else:
                raise ValueError(f"{where}: \"split\" must be one of {SPLITS}, got {split!r}")
            rows.append((_normalised(text), str(label), held_out))
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise ValueError(f"{path}: a classification task needs at least two labels, found "
                         f"{len(classes)}{' (' + classes[0] + ')' if classes else ''}")
    index = {label: i for i, label in enumerate(classes)}
    splits = _splits(classes, [(text, index[label], held_out) for text, label, held_out in rows])
    for name, texts in (("train", splits.train_texts), ("eval", splits.eval_texts)):
        if not texts:
            raise ValueError(f"{path}: no {name} texts (give some lines \"split\": \"{name}\", or leave "
                             f"\"split\" out so that 1 in {JSONL_EVAL_BUCKETS} is held out)")
    return splits


def _splits(classes: list[str], rows: list[tuple[str, int, bool]]) -> TextSplits:
    """Each split in the order of its texts' hashes: a stable order in which the first N texts
    are a fair sample (a file is often sorted by label)."""
    rows = sorted(rows, key=lambda row: _digest(row[0]))
    train = [(t, y) for t, y, held_out in rows if not held_out]
    evaluation = [(t, y) for t, y, held_out in rows if held_out]
    return TextSplits(classes, [t for t, _ in train], [y for _, y in train],
                      [t for t, _ in evaluation], [y for _, y in evaluation])


def _preview(item: dict) -> str:
    text = json.dumps(item, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
