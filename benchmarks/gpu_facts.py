"""The facts a GPU figure depends on, written before anything is measured: GPU, driver, CUDA,
cuDNN, torch / Triton / transformers versions, CPU, lrdaccel's version and commit.

    python benchmarks/gpu_facts.py OUT_DIR [--device cuda]

Writes OUT_DIR/machine.json and OUT_DIR/machine.md and prints the Markdown. Without a GPU it
records the CPU (the smoke run) and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from lrdaccel import __version__
from lrdaccel.measure.machine import cpu_model, machine_info

NVIDIA_SMI_FIELDS = "name,driver_version,memory.total,clocks.max.sm,power.limit,persistence_mode"


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def facts(device: str) -> dict:
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    info = {
        "machine": machine_info(device if on_gpu else "cpu"),
        "gpu_present": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in ("torch", "triton", "transformers", "safetensors", "numpy",
                                                       "onnxruntime")},
        "lrdaccel": __version__,
        # The GPU machine gets a copy of the working tree without .git: the caller may pass the commit.
        "commit": os.environ.get("LRDACCEL_COMMIT") or _run(["git", "rev-parse", "--short", "HEAD"],
                                                            Path(__file__).parent),
        "python": sys.version.split()[0],
    }
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = _run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv"])
    return info


def markdown(info: dict) -> str:
    m = info["machine"]
    gpu = (f"{m['gpu']} ({m['gpu_memory_gib']} GiB, compute capability {m['compute_capability']}), CUDA "
           f"{m['cuda']}, cuDNN {m['cudnn']}, bf16 {'yes' if m['bf16_supported'] else 'no'}"
           if "gpu" in m else "no GPU: CPU only (smoke run)")
    lines = [
        "# Machine",
        "",
        f"- GPU: {gpu}",
        f"- CPU: {cpu_model()}, {m['cpu_count']} cores, {m['torch_threads']} torch threads; {m['platform']}",
        f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
        f"- lrdaccel {info['lrdaccel']} (commit {info['commit'] or 'unknown'})",
    ]
    if info.get("nvidia_smi"):
        lines += ["", "nvidia-smi:", "", "```", info["nvidia_smi"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = facts(args.device)
    (args.out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    text = markdown(info)
    (args.out / "machine.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
