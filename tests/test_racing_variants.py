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
])
def test_bad_variants_name_the_variant_and_the_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)
