"""CLI options made from config fields: help from the docstring, defaults from the field,
nothing passed on that the user did not give, and "none" meaning None only where it is a choice."""

import argparse
from dataclasses import dataclass

import pytest

from lrdaccel.cli._config_args import add_config_args, field_help, given


@dataclass
class Example:
    """Settings.

    Attributes:
        width: how wide,
            on two lines.
        schedule: a schedule, or None for none.
        cache: a path, "none" for no file, None for the default file.
        budget / margin: two fields, one line.
        fast: go fast.
    """

    width: int = 8
    schedule: str | None = "rotate"
    cache: str | None = None
    budget: float | None = 2.0
    margin: float = 0.5
    fast: bool = False


def parser():
    p = argparse.ArgumentParser()
    add_config_args(p, Example, ["width", "schedule", "cache", "budget", "margin", "fast"],
                    flags={"width": "--size"}, choices={"schedule": ("rotate", "static")})
    return p


def test_help_comes_from_the_docstring_and_defaults_from_the_fields():
    helps = field_help(Example)
    assert helps["width"] == "how wide, on two lines."
    assert helps["budget"] == helps["margin"] == "two fields, one line."
    text = parser().format_help()
    assert "how wide, on two lines. (default 8)" in " ".join(text.split())
    assert "(default not set)" in text and "--no-fast" in text


def test_only_what_the_user_gave_is_passed_on():
    assert given(parser().parse_args([]), Example) == {}
    args = parser().parse_args(["--size", "4", "--fast", "--margin", "0.25"])
    assert given(args, Example) == {"width": 4, "fast": True, "margin": 0.25}


def test_none_is_none_only_where_it_is_a_choice():
    args = parser().parse_args(["--schedule", "none", "--cache", "none", "--budget", "none"])
    assert given(args, Example) == {"schedule": None, "cache": "none", "budget": None}


@pytest.mark.parametrize("argv", [["--schedule", "weekly"], ["--size", "wide"], ["--margin", "none"]])
def test_bad_values_are_argparse_errors(argv):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
