"""Checkpoint files written atomically, and the random-number state that an exact resume restores."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .toml_config import flatten

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "check_config_hash",
    "prepare_output_dir",
]

# How many changed settings a config-mismatch message lists before it only counts the rest.
_MAX_LISTED_CHANGES = 8


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


def check_config_hash(state: dict[str, Any], expected: str, path: str | Path, current: dict[str, Any] | None = None) -> None:
    """Raise ValueError when a checkpoint was written by a run with a different config.

    ``current`` is this run's config as nested dictionaries. When the checkpoint also stores its
    config, the message lists the settings that differ.
    """
    if state["config_hash"] == expected:
        return
    changes = ""
    if current is not None and isinstance(state.get("config"), dict):
        before, after = flatten(state["config"]), flatten(current)
        differing = [key for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]
        listed = [f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
                  for key in differing[:_MAX_LISTED_CHANGES]]
        if len(differing) > _MAX_LISTED_CHANGES:
            listed.append(f"and {len(differing) - _MAX_LISTED_CHANGES} more")
        if listed:
            changes = f"; changed settings: {', '.join(listed)}"
    raise ValueError(
        f"checkpoint {path} belongs to a different config (hash {state['config_hash']}, this run {expected})"
        f"{changes}. Use a new output folder (--output DIR), restore the original settings, or pass "
        f"--no-resume to delete this folder's checkpoints and results and start over"
    )


def prepare_output_dir(output_dir: Path, resume: bool, outputs: tuple[str, ...]) -> None:
    """Create a run's output folder. Without ``resume``, delete an earlier run's files there first.

    ``outputs`` names the files the run writes besides checkpoints/. Deleting them when a run
    starts over keeps an earlier run's results from standing next to the new run's config.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output folder {output_dir} is an existing file; pass the path of a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for name in outputs:
        (output_dir / name).unlink(missing_ok=True)
