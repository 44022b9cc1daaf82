"""How an image is cut into the network's windows: a sliding window over the whole image, or, for a
2D network on a volume, over each slice (MONAI's ``SliceInferer``); and the overlap-tile strategy's
mirrored image borders (Ronneberger et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer


def window_inferer(
    roi_size: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    mode: str,
    slice_axis: int | None = None,
) -> SlidingWindowInferer:
    """MONAI's sliding window; with ``slice_axis``, its slice-by-slice form for a 2D network on a volume
    (the 2D windows slide within each slice across that spatial axis)."""
    options = {"roi_size": list(roi_size), "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": mode}
    if slice_axis is None:
        return SlidingWindowInferer(**options)
    return SliceInferer(spatial_dim=int(slice_axis), **options)


class MirroredBorders(Inferer):
    """The overlap-tile strategy's borders: the image is mirrored outwards by ``margin`` voxels on every
    side before the sliding window, so that windows at its edge see mirrored context rather than the
    network's zero padding, and the margin is cut off the output. Not across ``slice_axis`` (a 2D
    network on a volume's slices sees no context across them). A margin is capped below the image's
    size along its axis, which reflection needs."""

    def __init__(self, inferer: Inferer, margin: int, slice_axis: int | None = None) -> None:
        self.inferer, self.margin, self.slice_axis = inferer, int(margin), slice_axis

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes = inputs.shape[2:]
        margins = [
            0 if axis == self.slice_axis else min(self.margin, size - 1) for axis, size in enumerate(sizes)
        ]
        padding = [side for margin in reversed(margins) for side in (margin, margin)]
        mirrored = F.pad(torch.as_tensor(inputs), padding, mode="reflect")
        output = self.inferer(mirrored, network, *args, **kwargs)
        inside = tuple(slice(margin, margin + size) for margin, size in zip(margins, sizes, strict=True))
        return output[(slice(None), slice(None), *inside)]
