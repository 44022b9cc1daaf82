"""Intensity normalisation by modality."""

from __future__ import annotations

import torch

from pipeline.transforms import is_nonzero, normalise_intensity


def test_ct_is_windowed_to_unit_range_with_air_at_zero() -> None:
    hu = torch.tensor([[[[-1000.0, -175.0, 0.0, 250.0, 1500.0]]]])
    out = normalise_intensity("image", "CT", ct_window=(-175, 250))({"image": hu})["image"]
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 175 / 425, 1.0, 1.0]))
    assert not is_nonzero(out).flatten()[0]


def test_mri_is_z_scored_over_foreground_and_background_stays_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 8, 8, 8)
    image[:, 2:6, 2:6, 2:6] = 500 + 80 * torch.randn(1, 4, 4, 4, generator=generator)
    out = normalise_intensity("image", "MRI")({"image": image})["image"]
    foreground = out[:, 2:6, 2:6, 2:6]
    assert abs(float(foreground.mean())) < 1e-4 and abs(float(foreground.std(unbiased=False)) - 1) < 1e-3
    assert torch.count_nonzero(out) == 64
