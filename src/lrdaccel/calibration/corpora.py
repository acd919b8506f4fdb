"""Real English text that ships offline, for calibration, distillation and evaluation of encoders.

Sources (Debian packages; `make data` installs them, or `apt-get install wordnet-base fortunes-min`):

- WordNet 3.0 (`wordnet-base`, /usr/share/wordnet/data.{noun,verb,adj,adv}): each synset's gloss
  is a definition followed by quoted example sentences ("the patient must be sedated"). Kind
  "example" is those sentences, "gloss" the definitions (phrases, capitalised, with a full stop).
- fortune(6) cookies (`fortunes-min`, /usr/share/games/fortunes/{fortunes,literature,riddles}):
  kind "fortune", quotations of 4 to 80 words.

Every distinct text (case and spacing ignored) belongs to exactly one split, decided by a hash of
its normalised text: about 1 in 10 is "evaluation", the rest "calibration". The split does not
depend on which kinds, how many or in which order texts are asked for, so calibration and
distillation data never share a sentence with evaluation data.

    from lrdaccel import zoo
    from lrdaccel.calibration import corpora
    calibration = corpora.sentences("calibration", limit=1024)
    held_out = corpora.sentences("evaluation", limit=256)
    batches = corpora.tokenized_batches(zoo.minilm_tokenizer(), calibration, batch_size=64)
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lrdaccel._settings import check_choice, check_int

WORDNET_DIR = Path(os.environ.get("LRDACCEL_WORDNET", "/usr/share/wordnet"))
FORTUNES_DIR = Path(os.environ.get("LRDACCEL_FORTUNES", "/usr/share/games/fortunes"))
SPLITS = ("calibration", "evaluation")
KINDS = ("example", "gloss", "fortune")
MIN_WORDS = 4  # shorter texts ("a bird", "to run") say little about a sentence encoder
MAX_FORTUNE_WORDS = 80  # longer fortunes are stories, truncated by any 128-token encoder
_EVALUATION_BUCKETS = 10  # 1 in 10 texts is held out
_QUOTED = re.compile(r'"([^"]+)"')


def _normalised(text: str) -> str:
    return " ".join(text.split())


def split_of(text: str) -> str:
    """The split ("calibration" or "evaluation") a text belongs to, by a hash of its normalised,
    lower-cased form: stable across runs, machines and Python versions."""
    digest = hashlib.sha1(_normalised(text).lower().encode("utf-8")).digest()
    return "evaluation" if digest[0] % _EVALUATION_BUCKETS == 0 else "calibration"


def _wordnet() -> list[tuple[str, str]]:
    texts = []
    for part in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base "
                                    f"(apt-get install wordnet-base) or set LRDACCEL_WORDNET")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            gloss = line.split("|", 1)[1].strip()
            for example in _QUOTED.findall(gloss):
                example = _normalised(example)
                if len(example.split()) >= MIN_WORDS:
                    texts.append(("example", example))
            definition = gloss.split(";")[0].strip()
            if '"' not in definition and len(definition.split()) >= MIN_WORDS:
                definition = _normalised(definition)
                texts.append(("gloss", definition[0].upper() + definition[1:] + "."))
    return texts


def _fortunes() -> list[tuple[str, str]]:
    texts = []
    for name in ("fortunes", "literature", "riddles"):
        path = FORTUNES_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install Debian's fortunes-min "
                                    f"(apt-get install fortunes-min) or set LRDACCEL_FORTUNES")
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = _normalised(cookie.replace("%", ""))
            if MIN_WORDS <= len(text.split()) <= MAX_FORTUNE_WORDS:
                texts.append(("fortune", text))
    return texts


@functools.lru_cache(maxsize=None)
def _rows(kinds: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """(split, kind, text) for every distinct text of these kinds, in file order."""
    sources = ([] if not {"example", "gloss"} & set(kinds) else _wordnet()) + \
        ([] if "fortune" not in kinds else _fortunes())
    seen, rows = set(), []
    for kind, text in sources:
        key = text.lower()
        if kind in kinds and key not in seen:
            seen.add(key)
            rows.append((split_of(text), kind, text))
    return tuple(rows)


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {list(kinds)!r}")
    return tuple(k for k in KINDS if k in kinds)


def sentences(split: str, kinds: tuple[str, ...] | str = KINDS, limit: int | None = None,
              seed: int = 0) -> list[str]:
    """Texts of one split and the given kinds, shuffled by `seed`, at most `limit` of them.

    Args:
        split: "calibration" (for calibration and distillation) or "evaluation" (held out).
        kinds: any of "example" (WordNet example sentences), "gloss" (WordNet definitions),
            "fortune" (fortune cookies).
        limit: how many (default all: about 125,600 calibration and 14,400 evaluation texts).
        seed: the shuffle; the same arguments give the same list on every machine.

    Raises:
        ValueError: an unknown split or kind, or a limit below 1.
        FileNotFoundError: a Debian package is not installed (the message says which).
    """
    check_choice("split", split, SPLITS)
    check_int("limit", limit, 1, optional=True)
    chosen = [text for s, _, text in _rows(_check_kinds(kinds)) if s == split]
    random.Random(seed).shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


def counts(kinds: tuple[str, ...] | str = KINDS) -> dict[str, int]:
    """How many texts each "split/kind" holds."""
    return dict(Counter(f"{split}/{kind}" for split, kind, _ in _rows(_check_kinds(kinds))))


def tokenized_batches(tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 128,
                      sort_by_length: bool = True) -> list[dict]:
    """Texts as model-ready batches (dicts of input_ids, attention_mask, ...), padded per batch.

    Sorting by length first (the default) puts texts of similar length together, so a batch
    carries little padding: faster, and fewer padded positions for statistics to ignore.
    """
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 1)
    if not texts:
        raise ValueError("no texts to tokenize")
    ordered = sorted(texts, key=len) if sort_by_length else list(texts)
    return [dict(tokenizer(ordered[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(ordered), batch_size)]
