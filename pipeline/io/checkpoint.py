"""Checkpoints written so that a crash at any moment leaves the previous one intact, and read so that
no code runs from the file and a checkpoint that does not fit says which file and what differs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.io.atomic import atomic_write

TRAINING_STATE_KEYS = frozenset({"network", "trainer"})  # what marks a full training state (latest.pt)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason in the message."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save through ``atomic_write``: a crash or a full disk mid-save leaves the previous
    checkpoint intact (``DiskFullError`` names the file)."""
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
        detail = str(error).splitlines()[0] if str(error) else "no detail"
        raise CheckpointError(
            f"checkpoint {path} cannot be read: truncated, or not a PyTorch checkpoint "
            f"({type(error).__name__}: {detail})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of states")
    return checkpoint


def network_weights(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network's state dict: the checkpoint itself (``model.pt``), or the ``network`` entry of a
    full training state (``latest.pt``), so an interrupted training's weights can be used too."""
    if set(checkpoint) >= TRAINING_STATE_KEYS:
        return checkpoint["network"]
    return checkpoint


def mismatch(module: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """What keeps ``state`` from loading into ``module``, in words; None when it fits.

    torch's own message lists every mismatch of a large network in one unreadable line; the first
    differing parameter with both shapes tells a user which network or setting differs.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} parameters missing (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} not in this network (first: {unexpected[0]})"] if unexpected else []
        return f"another network's weights: {', '.join(parts)}"
    for key, tensor in expected.items():
        found = state[key]
        if not isinstance(found, torch.Tensor):
            return f"parameter {key} is a {type(found).__name__}, not a tensor"
        if tuple(found.shape) != tuple(tensor.shape):
            return (
                f"parameter {key} has shape {_xs(found.shape)} in the checkpoint and "
                f"{_xs(tensor.shape)} in this network (other channels, features or classes?)"
            )
    return None


def load_weights(module: torch.nn.Module, state: Mapping[str, Any], source: str | Path) -> None:
    """``module.load_state_dict(state)``, or a CheckpointError naming ``source`` and the first mismatch."""
    problem = mismatch(module, state)
    if problem is None:
        try:
            module.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as error:  # dtype or a custom loader's complaint
            problem = str(error).splitlines()[0]
    if problem is not None:
        raise CheckpointError(f"checkpoint {source} does not fit this bundle's network: {problem}")


def _xs(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"
