"""Averaging several predictions of one case: test-time mirroring and ensembles of checkpoints.

Both average *probabilities* (softmax), as nnU-Net does when it mirrors and ensembles, and both
return the log of the average. The workflows apply a softmax to whatever the inferer returns, and
softmax(log p) = p when p sums to one, so the rest of the post-processing sees exactly the mean
probabilities without a config change.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from pipeline.inference.members import load_members
from pipeline.inference.windows import MirroredBorders

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]  # an image batch -> logits


def log_of_mean(probabilities: torch.Tensor, count: int) -> torch.Tensor:
    mean = probabilities / count
    return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


def flip_combinations(spatial_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the axes (the empty one is the plain pass), as tensor dims of (B, C, *spatial)."""
    dims = [axis + 2 for axis in spatial_axes]
    return [combo for size in range(len(dims) + 1) for combo in itertools.combinations(dims, size)]


def mirrored_probabilities(
    predict: Predictor, inputs: torch.Tensor, spatial_axes: Sequence[int]
) -> torch.Tensor:
    """Sum over all mirrorings of the softmax of ``predict``, each flipped back."""
    total = None
    for dims in flip_combinations(spatial_axes):
        logits = predict(torch.flip(inputs, dims) if dims else inputs)
        probabilities = torch.softmax(logits.float(), dim=1)
        probabilities = torch.flip(probabilities, dims) if dims else probabilities
        total = probabilities if total is None else total + probabilities
    return total


class FlipAveragingInferer(Inferer):
    """Test-time augmentation by mirroring: 2^n passes for n mirrored axes, softmax averaged."""

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] | None = None) -> None:
        self.inferer = inferer
        self.spatial_axes = None if spatial_axes is None else tuple(spatial_axes)  # None: every axis

    def axes(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return self.spatial_axes if self.spatial_axes is not None else tuple(range(inputs.dim() - 2))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        def predict(batch: torch.Tensor) -> torch.Tensor:
            return self.inferer(batch, network, *args, **kwargs)

        axes = self.axes(inputs)
        return log_of_mean(mirrored_probabilities(predict, inputs, axes), 2 ** len(axes))


class EnsembleInferer(Inferer):
    """The mean softmax of several (inferer, network) members; the workflow's own network is ignored,
    since each member brings its own (with its own patch size, for UNETR's fixed input)."""

    def __init__(self, members: Sequence[tuple[Inferer, torch.nn.Module]]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = None
        for inferer, member in self.members:
            probabilities = torch.softmax(inferer(inputs, member, *args, **kwargs).float(), dim=1)
            total = probabilities if total is None else total + probabilities
        return log_of_mean(total, len(self.members))


def choose_inferer(
    inferer: Inferer,
    tta: bool,
    ensemble: Sequence[Mapping[str, str]],
    overrides: Mapping[str, Any],
    device: Any,
    mirror_border: int = 0,
    slice_axis: int | None = None,
) -> Inferer:
    """The inference config's inferer: plain, mirrored (``tta``), or an ensemble of checkpoints; with
    ``mirror_border`` voxels of mirrored image around it (``MirroredBorders``; in the slices' plane
    only, for a 2D network on a volume's slices across ``slice_axis``)."""
    if ensemble:
        members = load_members(ensemble, overrides, device)
        if tta:
            members = [(FlipAveragingInferer(member_inferer), net) for member_inferer, net in members]
        chosen: Inferer = EnsembleInferer(members)
    else:
        chosen = FlipAveragingInferer(inferer) if tta else inferer
    return MirroredBorders(chosen, mirror_border, slice_axis) if mirror_border > 0 else chosen
