"""What a benchmark result was measured on: device, driver, library versions, commit."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str | None:
    try:
        return getattr(__import__(name), "__version__", None)
    except Exception:  # noqa: BLE001 - a missing or broken optional package is just "absent"
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def environment(device: str) -> dict:
    """A flat record of the machine and software; every result row carries it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = props.name
        extra = {
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(),
            "cuda": torch.version.cuda,
        }
    else:
        name = _cpu_name()
        extra = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # rows: threads while timing
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "device": name,
        "device_type": dev.type,
        **extra,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "transformers": _version("transformers"),
        "trifuse": _module_version("trifuse"),
        "git_commit": commit,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_slug(env: dict) -> str:
    """A file-name-safe short name for the device, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", str(env["device"]).lower()).strip("-") or env["device_type"]
