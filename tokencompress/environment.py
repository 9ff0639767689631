"""What a measurement ran on: versions, machine and device, recorded with every result."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["describe_environment", "environment_line", "load_average", "cpu_model"]


def describe_environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Python, torch, transformers and tokencompress versions; CPU, cores, threads, device, GPU, load."""
    import transformers

    from . import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokencompress": __version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["load_average_1_5_15_min"] = load_average()
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, how busy it was around a run."""
    return [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_line(info: dict[str, Any]) -> str:
    """One line for a report: the versions, then where it ran (from `describe_environment`)."""
    where = info.get("gpu") or f"{info['cpu']}, {info['logical_cores']} logical cores"
    return (
        f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; "
        f"device {info['device']} ({where})"
    )
