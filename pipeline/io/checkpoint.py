"""Checkpoints written so that a crash at any moment leaves the previous one intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.io.atomic import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason in the message."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through ``atomic_write``: a crash mid-save leaves the previous checkpoint intact."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with weights_only=True (no code runs from the file), naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of states")
    return checkpoint
