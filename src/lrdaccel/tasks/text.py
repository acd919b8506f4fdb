"""Labelled text tasks offline: WordNet noun supersenses, and a user's own JSONL file.

`wordnet-supersense`: every noun synset's gloss (its definition, the text before its first
quoted example) labelled by the synset's lexicographer file (noun.animal, noun.artifact, ...: 26
classes), read from Debian's `wordnet-base` (/usr/share/wordnet/data.noun). A text that occurs
with two labels is dropped (its label is not a function of the text), duplicates are kept once.
The 2,000 texts with the smallest SHA-1 of their normalised text are held out for evaluation:
stable across runs, machines and orders, and independent of anything else asked for.

A JSONL file (UTF-8): one object per line with "text" and "label" and optionally "split"
("train" or "eval"). Without "split", 1 text in 10 is held out by a hash of its text, as
lrdaccel.calibration.corpora splits its sentences. Texts are compared with their runs of
whitespace made one space. The rules that keep a user's file from silently becoming another task:

- Labels are strings after strip, and a number is one label whatever its form: a JSON number and
  a string that reads as a JSON number are written in one canonical form (an integral value as an
  integer, another as Python's shortest float), so 1, 1.0, "1" and " 1.0 " are all the class "1"
  and 0.5 and "0.50" are "0.5". Other strings are compared exactly after strip: "pos" and "pos "
  are one class, "Pos" another. A JSON true / false is the label "true" / "false". NaN and
  infinite labels, objects and lists are refused, naming the line and the value.
- A text that occurs with two or more labels (within a split or across the two) is dropped, every
  line of it, as wordnet-supersense drops such glosses: its label is not a function of the text.
  How many is warned once (`TextSplits.conflicts`).
- Evaluation texts that also occur among the training texts are counted (`overlap`): accuracy on
  them measures memory. `lrdaccel.tasks.registry.load_task` counts them again as the model reads
  them (token ids: "Great" and "great" are one input to an uncased tokenizer), warns once and
  keeps the count on the loaded data for the race's report.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

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


_JSON_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Overlap:
    """Evaluation items whose text also occurs among the training texts (leakage): `count` of
    `eval_items`, and their `share` (count / eval_items, 0 to 1)."""

    count: int
    eval_items: int

    @property
    def share(self) -> float:
        return self.count / self.eval_items if self.eval_items else 0.0

    def __str__(self) -> str:
        return f"{self.count} of {self.eval_items} eval texts ({100 * self.share:.1f}%) also occur among the training texts"


def text_overlap(train_texts: Sequence[Hashable], eval_texts: Sequence[Hashable]) -> Overlap:
    """How many of `eval_texts` (each item, duplicates counted) occur in `train_texts`, compared
    as given: texts normalised by this module (`TextSplits.overlap`), or their token ids as a
    model reads them (`load_task`)."""
    seen = set(train_texts)
    return Overlap(sum(text in seen for text in eval_texts), len(eval_texts))


@dataclass
class TextSplits:
    """Texts and their label indices, per split; `classes[i]` names label i; `conflicts`: texts
    dropped because they occur with more than one label."""

    classes: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    conflicts: int = 0

    @property
    def overlap(self) -> Overlap:
        return text_overlap(self.train_texts, self.eval_texts)


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
    splits = _splits(list(NOUN_LEXFILES), [(t, next(iter(labels[t])), t in held_out) for t in texts])
    splits.conflicts = len(labels) - len(texts)
    return splits


def jsonl_task(path: str | Path) -> TextSplits:
    """A user's labelled texts; see the module docstring for the rules on labels, conflicting
    labels and overlap.

    Raises:
        FileNotFoundError: no such file; IsADirectoryError: a directory.
        ValueError: a line that is not UTF-8, not a JSON object with a non-empty "text" and a
            "label" (a string, a finite number or a bool), a "split" other than train/eval, a split with
            no texts, or fewer than two labels; the message names the file and the line.
    """
    path = Path(path)
    check_task_file(path)
    rows: list[tuple[str, str, bool]] = []
    with open(path, "rb") as handle:  # bytes, so that a decoding error can name its line
        for number, raw in enumerate(handle, 1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the "
                                 f"line); save the file as UTF-8") from None
            if line.strip():
                rows.append(_row(line, where))
    rows, conflicts = _drop_conflicts(rows, path)
    dropped = f" once {conflicts} text(s) with two labels are dropped" if conflicts else ""
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise ValueError(f"{path}: a classification task needs at least two labels, found "
                         f"{len(classes)}{' (' + classes[0] + ')' if classes else ''}{dropped}")
    index = {label: i for i, label in enumerate(classes)}
    splits = _splits(classes, [(text, index[label], held_out) for text, label, held_out in rows])
    splits.conflicts = conflicts
    for name, texts in (("train", splits.train_texts), ("eval", splits.eval_texts)):
        if not texts:
            raise ValueError(f"{path}: no {name} texts{dropped} (give some lines \"split\": \"{name}\", or leave "
                             f"\"split\" out so that 1 in {JSONL_EVAL_BUCKETS} is held out)")
    return splits


def check_task_file(path: Path) -> None:
    """A JSONL task path that can be read as a file.

    Raises:
        IsADirectoryError: a directory; FileNotFoundError: nothing there.
    """
    if path.is_dir():
        raise IsADirectoryError(f"task file {path} is a directory: give a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")


def _row(line: str, where: str) -> tuple[str, str, bool]:
    """(normalised text, canonical label, held out) of one JSONL line."""
    try:
        item = json.loads(line)
    except ValueError as error:  # JSONDecodeError, or an integer too long for Python to convert
        raise ValueError(f"{where}: not valid JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with \"text\" and \"label\", got {type(item).__name__}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: {_field_error(item, 'text', 'a non-empty string')}")
    label = canonical_label(item.get("label"))
    if label is None:
        raise ValueError(f"{where}: {_field_error(item, 'label', 'a non-empty string, a finite number or a bool')}")
    split = item.get("split")
    if split is None:
        held_out = _digest(text)[0] % JSONL_EVAL_BUCKETS == 0
    elif split in SPLITS:
        held_out = split == "eval"
    else:
        raise ValueError(f"{where}: \"split\" must be one of {SPLITS}, got {split!r}")
    return _normalised(text), label, held_out


def _field_error(item: dict, field: str, expected: str) -> str:
    """What is wrong with `item[field]`: missing, or not `expected` (its JSON value named)."""
    if field not in item:
        return f"no \"{field}\" in {_preview(item)}"
    return f"\"{field}\" must be {expected}, got {_clip(json.dumps(item[field], ensure_ascii=False))}"


def canonical_label(label: object) -> str | None:
    """A JSONL label as its class name (see the module docstring), or None where it is no label
    (missing, empty after strip, an object, a list, NaN or infinite)."""
    if isinstance(label, bool):  # before numbers: True is an int to Python
        return "true" if label else "false"
    if isinstance(label, str):
        label = label.strip()
        if _JSON_INTEGER.fullmatch(label):  # already canonical (no leading zeros), but for "-0"
            return "0" if label == "-0" else label
        if not _JSON_NUMBER.fullmatch(label):
            return label or None
        label = float(label)
    if not isinstance(label, (int, float)):
        return None
    if isinstance(label, float):
        if not math.isfinite(label):
            return None
        if label.is_integer():
            return str(int(label))
        return repr(label)
    return str(label)


def _drop_conflicts(rows: list[tuple[str, str, bool]], path: Path) -> tuple[list[tuple[str, str, bool]], int]:
    """The rows without the texts that occur with two or more labels, and how many texts those were
    (warned once, with an example)."""
    labels: dict[str, set[str]] = {}
    for text, label, _ in rows:
        labels.setdefault(text, set()).add(label)
    conflicting = {text for text, found in labels.items() if len(found) > 1}
    if not conflicting:
        return rows, 0
    kept = [row for row in rows if row[0] not in conflicting]
    example = min(conflicting)
    warnings.warn(f"{path}: {len(conflicting)} text(s) occur with two or more labels (e.g. {_clip(example)!r}: "
                  f"{', '.join(sorted(labels[example]))}); dropped their {len(rows) - len(kept)} lines, since their "
                  f"label is not a function of the text", stacklevel=3)
    return kept, len(conflicting)


def _splits(classes: list[str], rows: list[tuple[str, int, bool]]) -> TextSplits:
    """Each split in the order of its texts' hashes: a stable order in which the first N texts
    are a fair sample (a file is often sorted by label)."""
    rows = sorted(rows, key=lambda row: _digest(row[0]))
    train = [(t, y) for t, y, held_out in rows if not held_out]
    evaluation = [(t, y) for t, y, held_out in rows if held_out]
    return TextSplits(classes, [t for t, _ in train], [y for _, y in train],
                      [t for t, _ in evaluation], [y for _, y in evaluation])


def _preview(item: dict) -> str:
    return _clip(json.dumps(item, ensure_ascii=False))


def _clip(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
