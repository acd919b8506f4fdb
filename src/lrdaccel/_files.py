"""The files lrdaccel writes: atomically (a reader never sees half of one), into parent folders
created on the way (an output path is checked before any work, `check_output_path`, and its
missing folders are made when it is written), with the mode a plain write would give them (the
umask's, or an existing file's own), and with a versioned header (`format`, `version`) that every
reader checks before trusting anything else."""

from __future__ import annotations

import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping


def make_parents(target: str | os.PathLike) -> None:
    """Create the folders above `target` that do not exist yet.

    Raises:
        OSError: naming `target` (not some folder on the way).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"cannot create the folder for {target} ({error.strerror})") from None


def _create_temporary(target: Path, tag: str = "") -> str:
    """A new empty file beside `target` under a unique hidden name, created with mode 0o666 so
    that the umask applies exactly as for a plain open(): tempfile.mkstemp creates 0600, which
    left every output unreadable by a serving process or a colleague once renamed into place."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}{secrets.token_hex(4)}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(path)
    raise FileExistsError(f"cannot find a free temporary name beside {target}")


def _write(temporary: str, write: Callable[[str], object], target: Path) -> None:
    """write(temporary), then give it the mode a plain open(target, "w") would leave: an existing
    target's own mode (a file its owner made private stays private), else the mode the temporary
    was created with. Set after writing: a writer that renames its own temporary over ours
    (safetensors does, with mode 0600) would undo it."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
    write(temporary)
    os.chmod(temporary, mode)


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(temporary_path) beside target (its folders created), then rename: readers never
    see half a file. An OSError names `target`, never the hidden temporary file."""
    target = Path(target)
    make_parents(target)
    temporary = _create_temporary(target)
    try:
        _write(temporary, write, target)
        os.replace(temporary, target)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if temporary not in str(error):
            raise
        raise OSError(error.errno, f"writing {target} failed ({error.strerror})") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_together(files: dict[Path, Callable[[str], object]]) -> None:
    """Write several files that belong together (a config and the weights it describes) so that
    the old set stays until the new set is complete: each new file is written in full under a
    temporary name, then the files replace the old ones in order; if a replacement fails, the
    files already replaced are put back. A failure at any step leaves either the old set or the
    new set.
    """
    staged: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    replaced: list[Path] = []
    try:
        for target, write in files.items():
            make_parents(target)
            temporary = _create_temporary(target, "new.")
            staged[target] = Path(temporary)
            _write(temporary, write, target)
        for target in list(staged):
            if target.exists():
                backup = _create_temporary(target, "old.")
                try:
                    os.replace(target, backup)  # the old file keeps its content under the backup name
                except BaseException:
                    Path(backup).unlink(missing_ok=True)
                    raise
                backups[target] = Path(backup)
            os.replace(staged[target], target)
            del staged[target]
            replaced.append(target)
    except BaseException:
        for target in staged.values():
            target.unlink(missing_ok=True)
        for target in replaced:
            if target not in backups:
                target.unlink(missing_ok=True)
        for target, backup in backups.items():
            os.replace(backup, target)
        raise
    for backup in backups.values():
        backup.unlink(missing_ok=True)


def check_output_dir(path: Path) -> None:
    """A directory we will write into: fine if it exists as a directory or can be created.

    Raises:
        ValueError: it is a file, or one of its parents is a file.
    """
    check_output_path(path, directory=True)


def check_output_path(path: Path, directory: bool = False) -> None:
    """Check before any work that `path` (a file, or a directory if `directory`) can be written:
    it is not the other kind of thing, and its nearest existing parent is a writable directory.

    Raises:
        ValueError: naming the path and what is in the way.
    """
    path = Path(path)
    kind = "directory" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{path}: is {'a file' if directory else 'a directory'}; expected a {kind} to write")
    parent = path if directory else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: cannot write a {kind} here, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write a {kind} here, {parent} is not writable")


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


def warn_unknown_fields(data: Mapping, known: set[str], source: str, what: str) -> None:
    """Warn once about fields this lrdaccel does not know: a newer one wrote them, and what they
    say (a setting the weights depend on, perhaps) is ignored here. Called by a config reader that
    a loader calls: the warning points at the loader's caller."""
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {what} fields {unknown} (written by a newer lrdaccel? upgrade)",
                      stacklevel=4)


def check_model_class(saved: Any, model: Any, source: str) -> None:
    """The model a checkpoint is loaded onto must be of the class it was saved from (by name, the
    one thing the file records): a subclass with another forward takes the same tensors and
    silently computes something else.

    Raises:
        ValueError: naming both classes and `source`.
    """
    mine = type(model).__name__
    if saved is not None and saved != mine:
        raise ValueError(f"{source}: model_class is {saved!r} but the model given is a {mine!r}; "
                         f"load it onto a {saved}")
