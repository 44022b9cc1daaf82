"""Refinement of the class probabilities by a conditional random field (CRF), before the argmax.

A fully connected CRF (Krähenbühl & Koltun 2011) made local as in ConvCRF (Teichmann & Cipolla 2018):
each voxel takes messages only from neighbours within a window, so mean-field inference is a few
shifted multiply-adds in PyTorch that run wherever the network runs. MONAI's
``monai.networks.blocks.CRF`` would do the same with a permutohedral lattice, but it needs the
compiled extension ``monai._C``, which the MONAI wheel does not ship.

The energy of labelling x is sum_i -log P_i(x_i) + sum_{i<j} mu(x_i, x_j) k(i, j), with Potts
compatibility mu (1 for different labels, else 0) and two Gaussian kernels, positions p in voxels of
the grid the network saw and intensities I standardised per image channel:

- smoothness: w_s exp(-|p_i - p_j|^2 / (2 theta_gamma^2)), which removes isolated voxels;
- appearance (bilateral): w_b exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |I_i - I_j|^2 / (2 theta_beta^2)),
  which lets a label spread over similar intensities but not across an edge.

Each weight is given per unit of its kernel's positional mass over the window (the messages are
divided by that constant), so that it means the same in 2D and 3D and for any width: the largest shift
in log-probability that a neighbourhood of one label can give a voxel.

Each mean-field iteration is Q = softmax(-unary - Potts(messages)), from Q = P. Both kernels reach two
sigmas. The smoothness kernel is a product of one Gaussian per axis, filtered axis by axis over the
cube of that radius. The bilateral one is not separable: it loops over the offsets of the ball of that
radius, capped at ``max_radius`` voxels since its cost grows as the ball's volume, and accumulates into
the messages, recomputing each offset's weights in every iteration rather than keeping them all (the
ball's size times the volume), so memory stays a few copies of the probabilities even for 3D volumes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

Overlap = tuple[tuple[slice, ...], tuple[slice, ...]]


@dataclass(frozen=True)
class CRFKernels:
    """Widths (voxels; intensities in standard deviations of the image) and weights of the kernels."""

    spatial_sigma: float = 1.0  # theta_gamma
    spatial_weight: float = 1.0  # w_s
    bilateral_sigma: float = 1.5  # theta_alpha
    intensity_sigma: float = 0.5  # theta_beta
    bilateral_weight: float = 3.0  # w_b
    max_radius: int = 3  # the bilateral window reaches at most this far, in voxels

    def __post_init__(self) -> None:
        widths = (self.spatial_sigma, self.bilateral_sigma, self.intensity_sigma)
        if min(widths) <= 0 or min(self.spatial_weight, self.bilateral_weight) < 0 or self.max_radius < 1:
            raise ValueError(f"CRF kernel widths must be positive and weights non-negative: {self}")


def window_radius(sigma: float) -> int:
    """Half the window of a Gaussian of ``sigma`` voxels: two sigmas."""
    return math.ceil(2 * sigma)


def half_window(radius: float, dims: int) -> list[tuple[int, ...]]:
    """The offsets within ``radius`` voxels whose first non-zero component is positive: one of each
    pair (o, -o), since the kernels are symmetric and one weight serves both directions. A ball rather
    than the cube around it: in 3D the cube of radius 2 has 124 neighbours, the ball 32, and the
    corners it drops are the ones the Gaussian weighs least."""
    zero = (0,) * dims
    reach = range(-math.floor(radius), math.floor(radius) + 1)
    window = itertools.product(reach, repeat=dims)
    return [o for o in window if o > zero and sum(c * c for c in o) <= radius**2]


def overlap(offset: tuple[int, ...], shape: tuple[int, ...]) -> Overlap | None:
    """Slices of the voxels i and their neighbours i + offset, both inside the grid; None if none are."""
    if any(abs(o) >= n for o, n in zip(offset, shape, strict=True)):
        return None
    here = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, shape, strict=True))
    there = tuple(slice(max(0, o), n + min(0, o)) for o, n in zip(offset, shape, strict=True))
    return (slice(None), *here), (slice(None), *there)


def spatial_message(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sum over the window of exp(-|dp|^2 / (2 sigma^2)) Q_j, the voxel itself left out, per unit of
    the kernel's mass. The kernel is a product of one Gaussian per axis, so it is filtered axis by
    axis (zero beyond the grid)."""
    taps = [math.exp(-(shift**2) / (2 * sigma**2)) for shift in range(1, window_radius(sigma) + 1)]
    out = q
    for axis in range(1, q.ndim):
        size = q.shape[axis]
        blurred = out.clone()
        for shift, weight in enumerate(taps[: size - 1], start=1):
            blurred.narrow(axis, 0, size - shift).add_(out.narrow(axis, shift, size - shift), alpha=weight)
            blurred.narrow(axis, shift, size - shift).add_(out.narrow(axis, 0, size - shift), alpha=weight)
        out = blurred
    mass = (1 + 2 * sum(taps)) ** (q.ndim - 1) - 1
    return out.sub_(q).div_(mass)


def bilateral_message(q: torch.Tensor, features: torch.Tensor, kernels: CRFKernels) -> torch.Tensor:
    """Sum over the window of the appearance kernel times Q_j, per unit of its positional part's mass.
    ``features`` are the intensities divided by sqrt(2) theta_beta, so a squared difference is the
    kernel's intensity term."""
    out = torch.zeros_like(q)
    offsets = half_window(min(2 * kernels.bilateral_sigma, kernels.max_radius), q.ndim - 1)
    positional = [math.exp(-sum(c * c for c in o) / (2 * kernels.bilateral_sigma**2)) for o in offsets]
    mass = 2 * sum(positional)
    buffers = features.new_empty(features.numel()), features.new_empty(features[0].numel())
    for offset, distance in zip(offsets, positional, strict=True):
        slices = overlap(offset, tuple(q.shape[1:]))
        if slices is None:
            continue
        here, there = slices
        weight = similarity(features[here], features[there], buffers)
        out[here].addcmul_(q[there], weight, value=distance / mass)
        out[there].addcmul_(q[here], weight, value=distance / mass)
    return out


def similarity(a: torch.Tensor, b: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """exp(-|a - b|^2) over the feature channels, as (1, *spatial), written into the two flat scratch
    ``buffers`` (fresh tensors would be page-faulted in at every offset of every iteration)."""
    diff = torch.sub(a, b, out=scratch(buffers[0], a.shape))
    weight = torch.mul(diff[:1], diff[:1], out=scratch(buffers[1], diff[:1].shape))
    for channel in range(1, diff.shape[0]):
        weight.addcmul_(diff[channel : channel + 1], diff[channel : channel + 1])
    return weight.neg_().exp_()


def scratch(buffer: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The start of a flat ``buffer`` as a contiguous tensor of ``shape``."""
    return buffer[: math.prod(shape)].view(shape)


def potts(messages: torch.Tensor) -> torch.Tensor:
    """Potts compatibility: the cost of label l is the kernel-weighted mass of every other label."""
    return messages.sum(0, keepdim=True) - messages


def mean_field(
    probs: torch.Tensor, features: torch.Tensor, kernels: CRFKernels, iterations: int
) -> torch.Tensor:
    """Refined (C, *spatial) probabilities from softmax ``probs`` and (F, *spatial) ``features``,
    already in units of theta_beta (see :func:`bilateral_message`)."""
    unary = -probs.float().clamp_min(1e-8).log()
    q = torch.softmax(-unary, dim=0)
    for _ in range(iterations):
        messages = spatial_message(q, kernels.spatial_sigma).mul_(kernels.spatial_weight)
        if kernels.bilateral_weight:
            messages.add_(bilateral_message(q, features, kernels), alpha=kernels.bilateral_weight)
        q = torch.softmax(-unary - potts(messages), dim=0)
    return q


def standardised(image: torch.Tensor) -> torch.Tensor:
    """Each channel divided by its standard deviation over the image, so that theta_beta means the
    same after a CT window scaled to [0, 1] as after an MRI z-score (a constant channel is kept)."""
    image = image.float()
    spread = image.flatten(1).std(dim=1).reshape(-1, *[1] * (image.ndim - 1))
    return image / torch.where(spread > 0, spread, torch.ones_like(spread))


class CRFRefined(MapTransform):
    """Softmax probabilities (C, *spatial) refined by a mean-field CRF over the image's intensities.

    Args:
        keys: the probabilities, channel first, on the image's grid.
        image_key: the image (F, *spatial); all its channels form the intensity feature vector.
        iterations: mean-field iterations (0 returns the probabilities renormalised).
        others: the kernels' widths and weights, as in :class:`CRFKernels`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        iterations: int = 5,
        spatial_sigma: float = 1.0,
        spatial_weight: float = 1.0,
        bilateral_sigma: float = 1.5,
        intensity_sigma: float = 0.5,
        bilateral_weight: float = 3.0,
        max_radius: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.iterations = int(iterations)
        self.kernels = CRFKernels(
            spatial_sigma, spatial_weight, bilateral_sigma, intensity_sigma, bilateral_weight, max_radius
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = convert_to_tensor(d[self.image_key], track_meta=False)
        features = standardised(image) / (math.sqrt(2) * self.kernels.intensity_sigma)  # once for every key
        for key in self.key_iterator(d):
            probs = convert_to_tensor(d[key], track_meta=False)  # MetaTensor's per-op bookkeeping is slow
            if image.shape[1:] != probs.shape[1:]:
                raise ValueError(f"{key} {tuple(probs.shape)} is not on the grid of {tuple(image.shape)}")
            features = features.to(probs.device)
            refined = mean_field(probs, features, self.kernels, self.iterations)
            d[key] = convert_to_dst_type(refined, d[key], dtype=torch.float32)[0]
        return d
