"""Checkpoint files written atomically, and the random-number state that an exact resume restores."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "check_config_hash"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with torch.save to a temporary file, then rename it over ``path``.

    The rename is atomic, so an interrupted save leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Read a checkpoint written by ``save_checkpoint``; returns None when ``path`` does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    # The state contains optimizer state, histories and numpy RNG state, not only tensors.
    return torch.load(path, map_location=device, weights_only=False)


def capture_rng_state() -> dict[str, Any]:
    """Return the Python, numpy, torch CPU and CUDA generator states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators back to a state from ``capture_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def check_config_hash(state: dict[str, Any], expected: str, path: str | Path) -> None:
    """Raise ValueError when a checkpoint was written by a run with a different config."""
    if state["config_hash"] != expected:
        raise ValueError(
            f"checkpoint {path} belongs to a different config (hash {state['config_hash']}, this run "
            f"{expected}); use a new output folder (--output DIR) or restore the original config, or pass "
            f"--no-resume to start over in this folder and replace its checkpoints (fit(resume=False) in Python)"
        )
