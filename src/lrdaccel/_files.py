"""The files lrdaccel writes: atomically (a reader never sees half of one), and with a versioned
header (`format`, `version`) that every reader checks before trusting anything else."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(temporary_path) beside target, then rename: readers never see half a file."""
    target = Path(target)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_header(data: Any, formats: str | tuple[str, ...], max_version: int, source: str, what: str) -> None:
    """`data` must be a mapping whose "format" is one of `formats` and whose "version" is an int
    from 1 up to `max_version`.

    Raises:
        ValueError: "{source}: not an lrdaccel {what} ...", or a version this lrdaccel cannot read
            (a newer one says "upgrade lrdaccel").
    """
    formats = (formats,) if isinstance(formats, str) else formats
    if not isinstance(data, Mapping) or data.get("format") not in formats:
        expected = " or ".join(repr(f) for f in formats)
        raise ValueError(f"{source}: not an lrdaccel {what} (missing format={expected})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: {what} version {version!r} is not valid (an int from 1 to {max_version})")
    if version > max_version:
        raise ValueError(f"{source}: {what} version {version} is newer than this lrdaccel reads "
                         f"({max_version}); upgrade lrdaccel")
