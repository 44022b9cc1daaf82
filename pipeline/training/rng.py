"""Random number generator states that a resumed training needs to continue as if never stopped.

``monai.utils.set_determinism`` seeds Python, NumPy and torch once at start; MONAI's DataLoader then
seeds every random transform from torch (each transform owns a NumPy ``RandomState``). A restarted
process repeats those seeds, so without the saved states epoch 11 after a resume would draw the
augmentations and the shuffle of epoch 1. Saved here: torch (CPU and CUDA), NumPy's and Python's
global generators, and the random state of every transform reachable from the training dataset
(those advance in the main process when ``num_workers`` is 0; with workers, each epoch's worker
seeds come from the torch generator, which is restored).

States are stored as tensors, ints and tuples only, so the checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# Objects whose attributes hold no transform: not searched (a module would lead everywhere).
OPAQUE = (
    torch.Tensor, np.ndarray, str, bytes, dict, type, types.ModuleType, types.FunctionType,
    types.BuiltinFunctionType, types.MethodType, logging.Logger, logging.Handler,
)  # fmt: skip


def _to_saved(state: tuple) -> tuple:
    kind, keys, position, has_gauss, cached = state
    return kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def _from_saved(state: tuple) -> tuple:
    kind, keys, position, has_gauss, cached = state
    return kind, keys.numpy().astype(np.uint32), position, has_gauss, cached


def random_states(root: object) -> Iterator[np.random.RandomState]:
    """Every NumPy generator reachable from ``root`` through attributes and lists, each once, in a
    fixed order (the same config builds the same objects, so the order matches after a restart).
    Dicts are not searched: in datasets they hold cached data, not transforms."""
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, OPAQUE):
            continue
        seen.add(id(item))
        if isinstance(item, np.random.RandomState):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif hasattr(item, "__dict__"):
            stack.extend(reversed(list(vars(item).values())))


def capture(data_loader: object | None = None) -> dict[str, Any]:
    """The generators' states now; ``data_loader``'s dataset transforms included when given."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _to_saved(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    dataset = getattr(data_loader, "dataset", None)
    if dataset is not None:
        state["transforms"] = [_to_saved(g.get_state()) for g in random_states(dataset)]
    return state


def restore(state: dict[str, Any], data_loader: object | None = None) -> None:
    """Set the generators back to ``capture``'s states (transforms only when their count matches)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_from_saved(state["numpy"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    dataset = getattr(data_loader, "dataset", None)
    saved = state.get("transforms")
    if dataset is None or saved is None:
        return
    generators = list(random_states(dataset))
    if len(generators) == len(saved):
        for generator, transform_state in zip(generators, saved, strict=True):
            generator.set_state(_from_saved(transform_state))
