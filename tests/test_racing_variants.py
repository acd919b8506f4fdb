"""race/variants.py: the --variants grammar, every option checked before any work, named errors."""

import pytest

from lrdaccel.racing.lrd_variant import LRD_DEFAULTS
from lrdaccel.racing.variants import parse_variants


def test_kinds_options_and_names_as_written():
    specs = parse_variants("lrd ,lrd(ratio=1.5, freeze=static, every_steps=40, method=svd),original(lr=2), original")
    assert [s.name for s in specs] == ["original", "lrd", "lrd(ratio=1.5, freeze=static, every_steps=40, method=svd)",
                                       "original(lr=2)"]
    assert [s.kind for s in specs] == ["original", "lrd", "lrd", "original"]
    assert specs[1].options == LRD_DEFAULTS
    assert specs[2].options == {**LRD_DEFAULTS, "ratio": 1.5, "freeze": "static", "every_steps": 40, "method": "svd"}
    assert specs[3].options == {"lr": 2, "kd": 0.0}


def test_values_are_typed():
    _, spec = parse_variants("original,lrd(sequential=true,merge=False,exclude='encoder\\.layer\\.0\\..*',kd=0.3)")
    assert spec.options["sequential"] is True and spec.options["merge"] is False
    assert spec.options["exclude"] == "encoder\\.layer\\.0\\..*" and spec.options["kd"] == 0.3


@pytest.mark.parametrize("text, message", [
    ("", "at least one"),
    (" , ", "at least one"),
    ("original,lora9", "unknown variant 'lora9'"),
    ("lrd", "include `original`"),
    ("original(lr=2)", "include `original`"),
    ("original," + "lrd(ratio=2", "unbalanced '\\('"),
    ("original," + "lrd)", "unbalanced '\\)'"),
    ("original," + "lrd(rank=4)", "variant 'lrd\\(rank=4\\)': unknown option 'rank'"),
    ("original," + "lrd(ratio=0.5)", "ratio"),
    ("original," + "lrd(method=tucker)", "method must be one of"),
    ("original," + "lrd(freeze=sometimes)", "freeze must be one of"),
    ("original," + "lrd(sequential=true,method=svd)", "sequential=true calibrates the whitened"),
    ("original," + "lrd(lr=0)", "lr must be a finite number > 0"),
    ("original," + "lrd(kd=2)", "kd must be a finite number >= 0 and <= 1"),
    ("original," + "lrd(exclude='[')", "is not a regex"),
    ("original," + "lrd(ratio)", "must be name=value"),
    ("original,original", "'original' is given twice"),
    ("original," + "lrd(ratio=2,ratio=3)", "variant 'lrd\\(ratio=2,ratio=3\\)': option 'ratio' is given twice"),
    ("original," + "prune(params=0.5, params=0.6)", "option 'params' is given twice"),
    ("original," + "lrd(form=wide)", "form must be one of"),
    ("original," + "lrd(form=narrow,merge=true)", "form=narrow does not combine with merge=true"),
    ("original," + "lrd(form=narrow,freeze=rotate)", "no factors to freeze in turn: give freeze=none"),
])
def test_bad_variants_name_the_variant_and_the_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def test_peers_are_variants_with_their_own_options():
    specs = parse_variants("original,lrd,prune,prune(params=0.5,importance=taylor),lora(rank=4)")
    assert [s.kind for s in specs] == ["original", "lrd", "prune", "prune", "lora"]
    assert specs[2].options["params"] == "lrd" and specs[3].options["params"] == 0.5
    assert specs[4].options == {"rank": 4, "alpha": 16.0, "ratio": 2.0, "lr": 10.0, "kd": 0.0}


@pytest.mark.parametrize("text, message", [
    ("original,prune", "matches the parameters of an lrd variant: put one before it"),
    ("original,prune,lrd", "matches the parameters of an lrd variant"),
    ("original,prune(params=1.5)", "params must be a fraction of the original's parameters in \\(0, 1\\), got 1.5"),
    ("original,prune(params=1)", "params must be a fraction of the original's parameters in \\(0, 1\\), got 1"),
    ("original,prune(params=0.5,importance=random)", "importance must be one of"),
    ("original,lora(rank=0)", "rank must be an int >= 1"),
])
def test_bad_peer_variants(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def test_a_missing_peers_extra_is_one_line_naming_the_variant(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ValueError, match=r"variant 'prune\(params=0.5\)': .*pip install lrdaccel\[peers\]"):
        parse_variants("original,prune(params=0.5)")


def test_lrd_and_prune_train_at_the_race_rate_and_the_defaults_have_their_control():
    """Issue 27: lr x2 gained the original as much as LRD (BENCHMARKS 10b), so `lrd` and `prune`
    default to the race's rate, and the default variants race an original at every multiplier."""
    from lrdaccel.racing.variants import DEFAULT_VARIANTS

    specs = parse_variants(DEFAULT_VARIANTS + ",prune")
    assert [spec.options["lr"] for spec in specs] == [1.0, 1.0, 1.0]
    defaults = parse_variants(DEFAULT_VARIANTS)
    controls = {spec.options["lr"] for spec in defaults if spec.kind == "original"}
    assert {spec.options["lr"] for spec in defaults} <= controls
