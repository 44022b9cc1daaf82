"""Checkpoints written so that a crash at any moment leaves the previous one intact, and read so that
no code runs from the file and a checkpoint that does not fit says which file and what differs.

A ``model.pt`` saved by training is self-describing: ``{"network": state_dict, "dataset": facts,
"config": keys}``, the facts being the datalist's header (labels, modality, name) and a fingerprint of
the training cases, the keys the training's plan and the overrides that shaped its network and
preprocessing, so a checkpoint copied anywhere still knows its classes, channels, network and
preprocessing. Bare state dicts (older checkpoints, model-zoo bundles) and full training states
(``latest.pt``) load as well.

Saved weights always carry the bare network's own keys, whatever wrapped it while training
(DistributedDataParallel, ``torch.compile``): ``unwrap`` is the one way to reach that network. Keys
that a wrapper prefixed (``module.``, ``_orig_mod.``: older or foreign checkpoints) load too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from pipeline.io.atomic import atomic_write
from pipeline.io.datalist_file import DATASET_INFO_FILE, read_json

NETWORK_KEY = "network"  # the network's state dict in a self-describing model.pt and in latest.pt
DATASET_KEY = "dataset"  # the dataset facts (datalist header and training-case fingerprint)
CONFIG_KEY = "config"  # config keys inference needs: the plan's and the network/preprocessing overrides
# What wrappers put before every key of a network's state dict, nested in either order:
# DistributedDataParallel's and DataParallel's `module.`, torch.compile's OptimizedModule `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DATA_PARALLEL = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file read in 1 MiB blocks: names an export after its checkpoint, and is the
    hash a bundle's ``large_files.yml`` lists."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            f"checkpoint {path} is truncated or not a checkpoint: it cannot be read "
            f"({type(error).__name__}: {detail})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of states")
    return checkpoint


def network_weights(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network's state dict: the ``network`` entry of a self-describing ``model.pt`` or of a full
    training state (``latest.pt``, so an interrupted training's weights can be used too), or the
    checkpoint itself when it is a bare state dict (its values are tensors, never a dict)."""
    network = checkpoint.get(NETWORK_KEY)
    return network if isinstance(network, Mapping) else checkpoint


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network under DistributedDataParallel/DataParallel and ``torch.compile``'s wrapper,
    nested in either order: its state dict has the plain keys, so a checkpoint saved from a compiled or
    multi-GPU training loads in an eager, single-process inference and in the model zoo.

    A network compiled in place (``Module.compile()``, as ``pipeline.networks.to_device`` does) is
    its own bare network. The wrapper of ``torch.compile(network)`` is recognised by its
    ``_orig_mod`` rather than by its class, whose import would load TorchDynamo (seconds) in every
    process.
    """
    while True:
        if isinstance(network, DATA_PARALLEL):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), torch.nn.Module):
            network = network._orig_mod
        else:
            return network


def plain_keys(state: Mapping[str, Any], expected: Iterable[str]) -> Mapping[str, Any]:
    """``state`` with the prefix a wrapper put before every key (``WRAPPER_PREFIXES``) taken off, one
    at a time while its keys are not ``expected`` (the bare network's): weights saved from a compiled or
    DDP network's own ``state_dict`` load into the bare one, and a network whose first module is itself
    named ``module`` keeps its keys. ``state`` itself when nothing comes off."""
    wanted = set(expected)
    while state and set(state) != wanted:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            break
        stripped = OrderedDict(state)
        if hasattr(state, "_metadata"):  # the modules' versions, which load_state_dict reads
            stripped._metadata = OrderedDict(state._metadata)
        consume_prefix_in_state_dict_if_present(stripped, prefix)
        state = stripped
    return state


def load_network_weights(
    network: torch.nn.Module, checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load ``checkpoint``'s network weights into ``network`` and return it: the one loader of inference,
    evaluation, ensembles and the benchmark, so each accepts what the others accept (a ``model.pt``,
    a ``latest.pt`` of a training stopped early, a bare state dict). A network wrapped for data
    parallelism or compiled gets them in its bare network (``load_weights``); a file that is unreadable
    or does not fit is a ``CheckpointError`` naming it and the first differing parameter."""
    state = network_weights(load_checkpoint(checkpoint, map_location))
    load_weights(network, state, checkpoint)
    return network


def model_state(
    weights: Mapping[str, Any], dataset: Mapping[str, Any] | None, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What ``model.pt`` holds: the weights and, when known, the dataset facts and the training's config
    keys that describe them (without either, a bare state dict, as the model zoo's)."""
    if not dataset and not config:
        return dict(weights)
    state: dict[str, Any] = {NETWORK_KEY: dict(weights)}
    if dataset:
        state[DATASET_KEY] = dict(dataset)
    if config:
        state[CONFIG_KEY] = dict(config)
    return state


def saved_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys a loaded checkpoint was trained with ({} for a bare state dict or an older file)."""
    config = checkpoint.get(CONFIG_KEY)
    return dict(config) if isinstance(config, Mapping) else {}  # a bare state dict's values are tensors


def with_training_config(checkpoint: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` over the checkpoint's training config: inference and evaluation build the network
    and the preprocessing the weights were trained with, and the user's own keys still win."""
    return {**saved_config(load_checkpoint(checkpoint)), **overrides}


def dataset_facts(checkpoint: str | Path) -> dict[str, Any]:
    """The labels, modality and name a checkpoint was trained with: stored inside it, or, for a
    checkpoint older than that, in the ``dataset.json`` beside it. Errors name the checkpoint."""
    path = Path(checkpoint)
    facts = load_checkpoint(path).get(DATASET_KEY)
    if isinstance(facts, Mapping) and "labels" in facts:
        return dict(facts)
    beside = path.with_name(DATASET_INFO_FILE)
    if not beside.is_file():
        raise CheckpointError(
            f"checkpoint {path} holds no dataset facts (labels, channels) and no {DATASET_INFO_FILE} lies "
            "beside it: put the training's dataset.json next to it, or use a model.pt saved by this version"
        )
    return read_json(beside)


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
    """``state`` into the bare network of ``module`` (``unwrap``), its keys freed of wrappers' prefixes
    (``plain_keys``), or a CheckpointError naming ``source`` and the first mismatch."""
    module = unwrap(module)
    state = plain_keys(state, module.state_dict().keys())
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
