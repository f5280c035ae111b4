"""The machine, its load and the torch thread count, recorded beside every benchmark figure."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch

__all__ = ["resolve_device", "set_threads", "load_average", "synchronize", "describe_machine"]


def resolve_device(name: str) -> torch.device:
    """Map --device to a device: "auto" is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"invalid --device {name!r}: no CUDA device is available; use auto or cpu")
        return torch.device(name)
    raise ValueError(f"invalid --device {name!r}: choose auto, cpu or cuda[:N]")


def set_threads(threads: int) -> int:
    """Set torch's intra-op CPU thread count and return it.

    Each process defaults to one thread per core, so two benchmark processes on a shared
    two-core machine oversubscribe it and every small op waits for a core.
    """
    if threads < 1:
        raise ValueError(f"invalid --threads {threads}: expected an integer >= 1")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> list[float]:
    """Return the 1-, 5- and 15-minute load averages, as `uptime` prints them."""
    return [round(value, 2) for value in os.getloadavg()]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)  # The value is in KiB.
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(device: torch.device) -> dict:
    """Describe the processor, memory, accelerator and library versions behind the numbers."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_total_gib(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchdiffeq": _version("torchdiffeq"),
        "mlflow": _version("mlflow"),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
