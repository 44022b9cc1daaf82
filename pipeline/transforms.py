"""The few transforms MONAI lacks as a single configurable step; everything else is MONAI's own."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import monai.transforms
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged
from monai.utils import TraceKeys

CT_MODALITIES = ("CT",)


def normalise_intensity(
    keys: Sequence[str] | str,
    modality: str,
    ct_window: Sequence[float] = (-175.0, 250.0),
    allow_missing_keys: bool = False,
) -> MapTransform:
    """Intensity normalisation chosen by modality, as nnU-Net does.

    CT intensities are calibrated (HU), so a fixed window clipped and scaled to [0, 1] keeps
    their meaning across scanners; air lands exactly on 0, which the foreground crop relies on.
    MRI intensities are arbitrary, so each volume is z-scored over its non-zero voxels,
    leaving the zero background at zero.
    """
    if modality.upper() in CT_MODALITIES:
        low, high = ct_window
        return ScaleIntensityRanged(
            keys,
            a_min=low,
            a_max=high,
            b_min=0.0,
            b_max=1.0,
            clip=True,
            allow_missing_keys=allow_missing_keys,
        )
    return NormalizeIntensityd(keys, nonzero=True, channel_wise=True, allow_missing_keys=allow_missing_keys)


def is_nonzero(image: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping after normalisation: anything that is not background zero."""
    return image != 0


class Spacingd(monai.transforms.Spacingd):
    """MONAI's ``Spacingd``, whose inverse interpolates one axis at a time when it is linear (the
    probabilities' case); Spacing keeps the direction cosines, so it is always along the axes.

    Why: to bring a 512x512x300 CT's probabilities back, MONAI's inverse builds a grid of three
    coordinates per output voxel, 0.9 GB and 1.3 GB more while ``affine_grid`` makes it, and that
    was the peak of the whole inference; trilinear interpolation is three linear ones in a row, which
    need only the output and one channel's temporary. The result equals MONAI's to float rounding
    (``tests/test_transforms.py``); every other case (nearest, reflection) is MONAI's.
    """

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        resampler = self.spacing_transform.sp_resample
        for key in self.key_iterator(result):
            image = result[key]
            plan = axis_aligned_plan(image, resampler.get_most_recent_transform(image))
            if plan is None:
                result[key] = self.spacing_transform.inverse(image)
                continue
            resampler.pop_transform(image)
            scale, offset, shape, padding, affine = plan
            values = resample_along_axes(image.as_tensor(), scale, offset, shape, padding)
            operations = image.applied_operations
            result[key] = MetaTensor(values, meta=dict(image.meta), applied_operations=operations)
            result[key].affine = affine
        return result


def axis_aligned_plan(image: Any, record: Mapping) -> tuple | None:
    """(scale, offset, output shape, padding, output affine) of an inverse that maps each output
    index j to the input index ``scale * j + offset`` per axis; ``None`` when it does not."""
    info = record[TraceKeys.EXTRA_INFO]
    linear = info["mode"] == "bilinear" and info["padding_mode"] in ("border", "zeros")
    volume = isinstance(image, MetaTensor) and image.ndim == 4  # (C, X, Y, Z)
    if not (volume and linear and info["align_corners"] in (False, TraceKeys.NONE)):
        return None
    source = to_affine_nd(3, image.affine).to(torch.float64).cpu()
    target = torch.as_tensor(info["src_affine"], dtype=torch.float64).cpu()
    xform = torch.linalg.solve(source, target)
    if not torch.allclose(xform[:3, :3], torch.diag(xform.diagonal()[:3]), atol=1e-6):
        return None
    shape = [int(n) for n in record[TraceKeys.ORIG_SIZE]]
    return xform.diagonal()[:3].tolist(), xform[:3, 3].tolist(), shape, info["padding_mode"], target


def resample_along_axes(
    values: torch.Tensor, scale: Sequence[float], offset: Sequence[float], shape: Sequence[int], padding: str
) -> torch.Tensor:
    """(C, X, Y, Z) values linearly interpolated at ``scale * j + offset`` on each axis, outside the
    input clamped to its border (``padding="border"``) or zero (``"zeros"``), as ``grid_sample``."""
    values = values.to(torch.float32)
    # the axes that shrink first, so the intermediate volumes stay small
    for axis in sorted(range(3), key=lambda a: shape[a] / values.shape[a + 1]):
        values = interpolate_axis(values, axis + 1, scale[axis], offset[axis], shape[axis], padding)
    return values


def interpolate_axis(
    values: torch.Tensor, dim: int, scale: float, offset: float, size: int, padding: str
) -> torch.Tensor:
    length = values.shape[dim]
    position = torch.arange(size, dtype=torch.float64, device=values.device) * scale + offset
    if padding == "border":
        position = position.clamp(0, length - 1)
    lower = position.floor()
    upper_weight = position - lower
    lower_weight = 1 - upper_weight
    lower = lower.long()
    upper = lower + 1
    if padding == "zeros":
        lower_weight[(lower < 0) | (lower >= length)] = 0
        upper_weight[(upper < 0) | (upper >= length)] = 0
    view = [size if d == dim - 1 else 1 for d in range(values.ndim - 1)]
    lower_weight = lower_weight.to(values.dtype).view(view)
    upper_weight = upper_weight.to(values.dtype).view(view)
    lower, upper = lower.clamp(0, length - 1), upper.clamp(0, length - 1)
    out = values.new_empty((*values.shape[:dim], size, *values.shape[dim + 1 :]))
    for channel in range(values.shape[0]):  # one channel's temporary at a time
        torch.index_select(values[channel], dim - 1, lower, out=out[channel])
        out[channel].mul_(lower_weight).addcmul_(values[channel].index_select(dim - 1, upper), upper_weight)
    return out
