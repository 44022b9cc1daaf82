"""Intensity normalisation by modality; the inverse of our Spacingd against MONAI's."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd, Orientationd
from monai.transforms import Spacingd as MonaiSpacingd

from pipeline.transforms import Spacingd, is_nonzero, normalise_intensity


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


def inverted(
    spacing_class: type, affine: torch.Tensor, pixdim: tuple, padding: str, nearest: bool = False
) -> MetaTensor:
    """Random probabilities on the preprocessed grid of a 40x37x15 image, brought back by Invertd."""
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 40, 37, 15)
    image[:, 5:30, 4:33, 2:13] = 1 + torch.rand(1, 25, 29, 11, generator=generator)
    preprocessing = Compose([
        Orientationd("image", "RAS"),
        spacing_class("image", pixdim=pixdim, padding_mode=padding, dtype=torch.float32),
        CropForegroundd("image", source_key="image"),
    ])  # fmt: skip
    item = preprocessing({"image": MetaTensor(image, affine=affine)})
    pred = torch.rand(2, *item["image"].shape[1:], generator=generator)
    item["pred"] = MetaTensor(pred, meta=item["image"].meta)
    return Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=nearest)(item)["pred"]


OBLIQUE = torch.tensor(
    [[0.8, 0.3, 0, 0], [-0.3, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]], dtype=torch.float64
)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize(
    ("affine", "pixdim"),
    [
        (torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64)), (1.5, 1.5, 1.5)),
        (torch.diag(torch.tensor([-0.7, 1.1, 3.0, 1.0], dtype=torch.float64)), (1.0, 2.0, 1.2)),
        (OBLIQUE, (1.5, 1.5, 1.5)),  # Spacing keeps the direction cosines: along the axes again
    ],
)
def test_spacing_inverse_equals_monais(affine: torch.Tensor, pixdim: tuple, padding: str) -> None:
    ours, monais = (
        inverted(Spacingd, affine, pixdim, padding),
        inverted(MonaiSpacingd, affine, pixdim, padding),
    )
    assert ours.shape == monais.shape == (2, 40, 37, 15)
    assert torch.allclose(ours.affine, monais.affine) and torch.allclose(ours.affine, affine)
    assert float((ours.as_tensor() - monais.as_tensor()).abs().max()) < 1e-5
    assert ours.applied_operations == [] and isinstance(ours, MetaTensor)


def test_nearest_inverse_is_monais() -> None:
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    ours = inverted(Spacingd, affine, (1.5, 1.5, 1.5), "border", nearest=True)
    assert torch.equal(ours, inverted(MonaiSpacingd, affine, (1.5, 1.5, 1.5), "border", nearest=True))
