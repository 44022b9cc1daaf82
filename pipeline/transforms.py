"""The few transforms MONAI lacks as a single configurable step; everything else is MONAI's own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

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
