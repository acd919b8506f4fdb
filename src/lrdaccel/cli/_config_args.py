"""Command-line options made from the library's config dataclasses, so the CLI states no default,
help text or check of its own: the default is the field's, the help is the field's line in the
class docstring's `Attributes:` section, and the value is checked by the config itself.

Every option is absent from the parsed arguments unless the user gave it (argparse.SUPPRESS),
so `given(args, Config)` holds exactly what to pass on, and the config (or a preset such as
`quick_config`) supplies the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Iterable

_DOC_FIELD = re.compile(r"^\s{8}([a-z_][a-z0-9_ /]*):\s*(.*)$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's description from the `Attributes:` section of `cls`'s docstring
    ("a / b: text" documents both fields)."""
    doc = cls.__doc__ or ""
    if "Attributes:" not in doc:
        return {}
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = _DOC_FIELD.match(line)
        if match:
            current = [name.strip() for name in match.group(1).split("/")]
            for name in current:
                helps[name] = match.group(2).strip()
        elif line.startswith(" " * 12) and current:
            for name in current:
                helps[name] += " " + line.strip()
        elif line.strip():
            current = []
    return helps


def _parser_type(annotation: str, default: Any, allowed: tuple | None = None):
    """An argparse type for a field. "none" gives None for an optional field whose default is
    not None (None is then a real choice, like no freezing schedule or no time budget); where
    None is the default, "none" is an ordinary value (a timing cache of "none" means no file)."""
    optional = "None" in annotation and default is not None
    if "float" in annotation:
        base = float
    elif "int" in annotation:
        base = int
    else:
        base = str

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if allowed is not None and text not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from "
                                             f"{', '.join(map(str, allowed))}{', none' if optional else ''})")
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if base is int else 'a number'}"
                                             f"{' or none' if optional else ''}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                    fields: Iterable[str], *, flags: dict[str, str] | None = None,
                    choices: dict[str, Iterable] | None = None, notes: dict[str, str] | None = None) -> None:
    """One option per named field of the dataclass `cls`.

    Args:
        fields: the field names to expose.
        flags: field -> option string where it is not `--field-name`.
        choices: field -> allowed values (shown in --help; the config checks them too).
        notes: field -> text appended to the help (e.g. what --quick changes).
    """
    helps = field_help(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    flags, choices, notes = flags or {}, choices or {}, notes or {}
    for name in fields:
        field = by_name[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = flags.get(name, "--" + name.replace("_", "-"))
        text = helps.get(name, "")
        shown = "not set" if default is None else default
        text = f"{text} (default {shown}{'; ' + notes[name] if name in notes else ''})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if isinstance(default, bool) or str(field.type).startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            allowed = tuple(choices[name]) if name in choices else None
            kwargs["type"] = _parser_type(str(field.type), default, allowed)
            if allowed is not None:
                optional = "None" in str(field.type) and default is not None
                kwargs["metavar"] = "{" + ",".join(map(str, allowed + (("none",) if optional else ()))) + "}"
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
