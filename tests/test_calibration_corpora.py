"""calibration/corpora.py: real English text from Debian's WordNet and fortunes, split for good between
calibration and evaluation."""

import pytest

from lrdaccel.calibration import corpora

pytestmark = pytest.mark.skipif(not (corpora.WORDNET_DIR / "data.noun").is_file()
                                or not (corpora.FORTUNES_DIR / "fortunes").is_file(),
                                reason="Debian wordnet-base / fortunes-min not installed (make data)")


def test_calibration_and_evaluation_never_share_a_text_whatever_is_asked():
    calibration = corpora.sentences("calibration")
    evaluation = corpora.sentences("evaluation")
    assert len(calibration) > 100_000 and len(evaluation) > 10_000
    lowered = {t.lower() for t in calibration}
    assert not lowered & {t.lower() for t in evaluation}
    # A subset by kind, limit or seed is drawn from the same split.
    for kinds in ("example", ("fortune",), ("gloss", "example")):
        assert not {t.lower() for t in corpora.sentences("evaluation", kinds, limit=500, seed=3)} & lowered


def test_deterministic_real_sentences_of_each_kind():
    first = corpora.sentences("calibration", ("example",), limit=50, seed=1)
    assert first == corpora.sentences("calibration", ("example",), limit=50, seed=1)
    assert first != corpora.sentences("calibration", ("example",), limit=50, seed=2)
    assert all(len(t.split()) >= corpora.MIN_WORDS for t in first)
    glosses = corpora.sentences("evaluation", "gloss", limit=20)
    assert all(t[0] == t[0].upper() and t.endswith(".") for t in glosses)
    counts = corpora.counts()
    assert set(counts) == {f"{s}/{k}" for s in corpora.SPLITS for k in corpora.KINDS}
    # About one text in ten is held out, for every kind.
    for kind in corpora.KINDS:
        share = counts[f"evaluation/{kind}"] / (counts[f"evaluation/{kind}"] + counts[f"calibration/{kind}"])
        assert 0.06 < share < 0.14, (kind, share)
    assert corpora.split_of("The patient must be sedated") == corpora.split_of("the  patient must be SEDATED")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        corpora.sentences("train")
    with pytest.raises(ValueError, match="kinds"):
        corpora.sentences("calibration", ("poems",))
    with pytest.raises(ValueError, match="limit"):
        corpora.sentences("calibration", limit=0)
    with pytest.raises(ValueError, match="no texts"):
        corpora.tokenized_batches(None, [])


def test_missing_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path)
    corpora._rows.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="fortunes-min"):
            corpora.sentences("calibration", ("fortune",))
    finally:
        corpora._rows.cache_clear()


def test_tokenized_batches_sorted_by_length_with_masks():
    from lrdaccel import zoo

    texts = corpora.sentences("calibration", limit=40)
    batches = corpora.tokenized_batches(zoo.minilm_tokenizer(), texts, batch_size=16)
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    lengths = [int(m.sum(1).max()) for m in (b["attention_mask"] for b in batches)]
    assert lengths == sorted(lengths) and all(b["input_ids"].shape == b["attention_mask"].shape for b in batches)
