"""The members of an ensemble: each checkpoint's network and sliding window, built from its bundle.

Members are averaged voxel by voxel in one preprocessed space, so they must agree on everything
that defines that space (spacing, intensity normalisation, label set); a disagreement is an error
naming the two members, never a silently misaligned average. Each member is built with its own
checkpoint's training config (``pipeline.io.checkpoint.saved_config``) beneath the shared overrides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer

from pipeline.bundle_parser import bundle_parser
from pipeline.inference.runtimes import on_runtime
from pipeline.io.checkpoint import load_network_weights
from pipeline.networks import to_device

SHARED_SPACE = ("spacing", "modality", "labels", "preprocessing_steps")


def member_parser(bundle: str, checkpoint: str, overrides: Mapping[str, Any]) -> ConfigParser:
    """The member's inference config: its own network and preprocessing (the checkpoint's training
    config) beneath the shared overrides."""
    return bundle_parser(bundle, "inference", overrides, checkpoint=checkpoint)


def space_of(parser: ConfigParser) -> str:
    """What must match between members, as comparable text (preprocessing unresolved: its config)."""
    facts = {key: parser.get_parsed_content(key) for key in SHARED_SPACE if key != "preprocessing_steps"}
    facts["preprocessing_steps"] = parser.get("preprocessing_steps")
    return json.dumps(facts, sort_keys=True, default=str)


def load_network(parser: ConfigParser, checkpoint: str, device: Any) -> torch.nn.Module:
    """The member's network with its weights (``model.pt``, ``latest.pt`` or a bare state dict), on
    its runtime."""
    network = load_network_weights(parser.get_parsed_content("network_def"), checkpoint)
    runtime = parser.get_parsed_content("runtime_used")
    compiled = parser.get_parsed_content("compile") and runtime == "torch"
    network = to_device(network, device, parser.get_parsed_content("channels_last"), compiled).eval()
    return on_runtime(network, runtime, checkpoint)


def load_members(
    ensemble: Sequence[Mapping[str, str]], overrides: Mapping[str, Any], device: Any
) -> list[tuple[Inferer, torch.nn.Module]]:
    """``ensemble`` lists ``{"bundle": name, "checkpoint": path}``; ``overrides`` apply to every member."""
    members, first_space, first_name = [], None, None
    for spec in ensemble:
        bundle, checkpoint = spec["bundle"], spec["checkpoint"]
        parser = member_parser(bundle, checkpoint, overrides)
        space = space_of(parser)
        if first_space is None:
            first_space, first_name = space, f"{bundle} ({checkpoint})"
        elif space != first_space:
            raise ValueError(
                f"ensemble members {first_name} and {bundle} ({checkpoint}) preprocess differently "
                "(spacing, normalisation or labels); only models trained in the same space can be averaged"
            )
        members.append((parser.get_parsed_content("inferer"), load_network(parser, checkpoint, device)))
    return members
