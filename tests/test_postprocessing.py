"""Post-processing on constructed label maps whose components, sizes and holes are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, FillHolesd, Invertd, KeepLargestConnectedComponentd, Spacingd

from pipeline.postprocessing import (
    ArgMaxd,
    DropBackgroundd,
    RemoveSmallComponentsd,
    channel_argmax,
    class_indices,
    size_limits,
    voxel_spacing,
)

LABELS = {0: "background", 1: "organ", 2: "core"}


def label_map(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> MetaTensor:
    """Organ: a 6^3 box (216 voxels) and a 2^3 island (8); core: a 4^3 box (64) and a 1x1x3 island (3)."""
    data = torch.zeros(1, 24, 24, 24)
    data[0, 2:8, 2:8, 2:8] = 1
    data[0, 12:14, 12:14, 12:14] = 1
    data[0, 16:20, 2:6, 2:6] = 2
    data[0, 20, 20, 18:21] = 2
    affine = torch.diag(torch.tensor([-spacing[0], spacing[1], spacing[2], 1.0], dtype=torch.float64))
    return MetaTensor(data, affine=affine)


def voxels(volume: torch.Tensor, label: int) -> int:
    return int((volume == label).sum())


def test_islands_under_the_volume_become_background() -> None:
    out = RemoveSmallComponentsd("pred", min_mm3=10, label_names=LABELS)({"pred": label_map()})["pred"]
    assert voxels(out, 1) == 216 and voxels(out, 2) == 64  # 8 mm^3 and 3 mm^3 islands removed
    assert voxels(out, 0) == 24**3 - 216 - 64
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, label_map().affine)


def test_the_limit_is_a_volume_so_the_voxel_size_decides() -> None:
    """The 8-voxel island is 8 mm^3 at 1 mm but 24 mm^3 at 1x1x3 mm: kept under a 20 mm^3 limit."""
    remove = RemoveSmallComponentsd("pred", min_mm3=20, label_names=LABELS)
    assert voxels(remove({"pred": label_map((1.0, 1.0, 1.0))})["pred"], 1) == 216
    assert voxels(remove({"pred": label_map((1.0, 1.0, 3.0))})["pred"], 1) == 216 + 8


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 3.0)])
def test_a_volume_exactly_at_the_limit_is_kept(spacing: tuple[float, float, float]) -> None:
    island_mm3 = 8 * float(np.prod(spacing))
    at_limit = RemoveSmallComponentsd("pred", min_mm3=island_mm3, label_names=LABELS)
    assert voxels(at_limit({"pred": label_map(spacing)})["pred"], 1) == 216 + 8
    above = RemoveSmallComponentsd("pred", min_mm3=island_mm3 + 0.01, label_names=LABELS)
    assert voxels(above({"pred": label_map(spacing)})["pred"], 1) == 216


def test_per_class_limits_by_name_or_index() -> None:
    by_name = RemoveSmallComponentsd("pred", min_mm3={"core": 10}, label_names=LABELS)
    out = by_name({"pred": label_map()})["pred"]
    assert voxels(out, 1) == 216 + 8 and voxels(out, 2) == 64
    by_index = RemoveSmallComponentsd("pred", min_mm3={1: 10}, label_names=LABELS)
    out = by_index({"pred": label_map()})["pred"]
    assert voxels(out, 1) == 216 and voxels(out, 2) == 64 + 3


def test_the_voxel_size_after_invertd_is_the_input_space() -> None:
    """Resampled to 1 mm for the network, inverted back to 1x1x3 mm: the limit uses 3 mm slices."""
    image = label_map((1.0, 1.0, 3.0))
    preprocessing = Compose([Spacingd("image", pixdim=(1.0, 1.0, 1.0), mode="nearest")])
    data = preprocessing({"image": image})
    assert voxel_spacing(data["image"]) == pytest.approx((1.0, 1.0, 1.0))
    data["pred"] = data["image"].clone()
    restored = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert voxel_spacing(restored) == pytest.approx((1.0, 1.0, 3.0))
    out = RemoveSmallComponentsd("pred", min_mm3=20, label_names=LABELS)({"pred": restored})["pred"]
    assert voxels(out, 1) == 216 + 8


def test_keep_largest_component_per_class() -> None:
    keep = KeepLargestConnectedComponentd(
        "pred", applied_labels=class_indices(["core"], LABELS), independent=True
    )
    out = keep({"pred": label_map()})["pred"]
    assert voxels(out, 1) == 216 + 8 and voxels(out, 2) == 64


def test_fill_holes_per_class() -> None:
    volume = label_map()
    volume[0, 4, 4, 4] = 0  # a hole inside the organ box
    volume[0, 17:19, 3:5, 3:5] = 0  # a hole inside the core box
    fill = FillHolesd("pred", applied_labels=class_indices(["organ"], LABELS))
    out = fill({"pred": volume})["pred"]
    assert out[0, 4, 4, 4] == 1 and voxels(out, 2) == 64 + 3 - 8


def test_class_selection() -> None:
    assert class_indices(["core", "organ"], LABELS) == [1, 2]
    assert class_indices([2], LABELS) == [2]
    assert class_indices("all", LABELS) == class_indices(True, LABELS) == [1, 2]
    assert class_indices([], LABELS) == class_indices(None, LABELS) == class_indices(False, LABELS) == []
    with pytest.raises(ValueError, match=r"unknown class 'liver'.*organ"):
        class_indices(["liver"], LABELS)
    with pytest.raises(ValueError, match="background"):
        class_indices(["background"], LABELS)


def test_size_limits() -> None:
    assert size_limits(5, LABELS) == {1: 5.0, 2: 5.0}
    assert size_limits(0, LABELS) == size_limits(None, LABELS) == {}
    assert size_limits({"organ": 7, "core": 0}, LABELS) == {1: 7.0}
    with pytest.raises(ValueError, match="negative"):
        size_limits({"organ": -1}, LABELS)


def test_without_an_affine_the_volume_is_refused() -> None:
    with pytest.raises(ValueError, match="voxel size"):
        RemoveSmallComponentsd("pred", min_mm3=10, label_names=LABELS)({"pred": torch.zeros(1, 4, 4, 4)})
    assert voxel_spacing(MetaTensor(np.zeros((1, 2, 2, 2)), affine=torch.eye(4))) == (1.0, 1.0, 1.0)


def test_channel_argmax_equals_torch_argmax_ties_included() -> None:
    scores = torch.rand(4, 9, 10, 11)
    scores[:, 0, 0, 0] = 0.25  # a four-way tie: the lowest index wins, as in torch.argmax
    scores[1:3, 1, 1, 1] = 2.0
    assert torch.equal(channel_argmax(scores), torch.argmax(scores, dim=0).float())
    assert channel_argmax(scores)[1, 1, 1] == 1


def test_argmaxd_keeps_metadata_and_shape() -> None:
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    scores = MetaTensor(torch.rand(3, 5, 6, 7), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    label_map = ArgMaxd("pred")({"pred": scores})["pred"]
    assert isinstance(label_map, MetaTensor) and label_map.shape == (1, 5, 6, 7)
    assert label_map.dtype == torch.float32
    assert torch.equal(label_map.affine, affine) and label_map.meta["filename_or_obj"] == "case.nii.gz"


def test_argmax_without_the_background_channel_after_resampling_back() -> None:
    """The inference path: softmax, background dropped, Invertd's interpolation, argmax."""
    torch.manual_seed(0)
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 30, 28, 12), affine=affine)
    resample = Spacingd("image", pixdim=(1.5, 1.5, 1.5), dtype=torch.float32)
    resampled = resample({"image": image})["image"]
    logits = 4 * torch.randn(3, *resampled.shape[1:])
    probabilities = MetaTensor(torch.softmax(logits, 0), meta=resampled.meta)
    item = {"image": resampled, "full": probabilities, "fg": probabilities}
    item = DropBackgroundd("fg")(item)
    item = Invertd(["full", "fg"], transform=resample, orig_keys="image", nearest_interp=False)(item)
    expected = torch.argmax(item["full"], dim=0).float()
    assert item["fg"].shape[1:] == image.shape[1:] and item["fg"].shape[0] == 2
    assert torch.equal(ArgMaxd("fg", background_omitted=True)(item)["fg"][0], expected)
