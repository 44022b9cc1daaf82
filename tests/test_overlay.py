"""Overlays from real NIfTI files on disk: what a user would point save_overlay at."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from pipeline.visualisation import save_overlay
from pipeline.visualisation.overlay import (
    class_colour,
    intensity_window,
    mean_dice,
    overlay_figure,
    panel_extent,
)

SHAPE = (40, 40, 16)
SPACING = (0.8, 0.8, 3.0)


def _lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """LPS storage (first two axes flipped relative to RAS), the DICOM-style layout nibabel must undo."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [20.0, 20.0, -30.0]
    return affine


def _ball(
    shape: tuple[int, ...], centre: tuple[float, ...], radius_mm: float, spacing: tuple[float, ...]
) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True))
    return dist2 <= radius_mm**2


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """A bright sphere in noise with a two-class segmentation (shell = 1, core = 2)."""
    affine = _lps_affine(SPACING)
    centre = (18, 22, 8)
    outer, inner = _ball(SHAPE, centre, 9.0, SPACING), _ball(SHAPE, centre, 4.0, SPACING)
    image = np.random.default_rng(0).normal(100.0, 10.0, SHAPE).astype(np.float32) + 300.0 * outer
    seg = outer.astype(np.uint8) + inner.astype(np.uint8)
    return {
        "image": _save(tmp_path / "image.nii.gz", image, affine),
        "seg": _save(tmp_path / "seg.nii.gz", seg, affine),
    }


def _pixels_of(png: np.ndarray, rgb: tuple[float, float, float]) -> int:
    return int((np.abs(png[..., :3] - np.asarray(rgb)) < 1.5 / 255).all(axis=-1).sum())


def test_png_shows_present_classes_only(case: dict[str, Path], tmp_path: Path) -> None:
    out = save_overlay(
        case["image"],
        case["seg"],
        tmp_path / "out" / "overlay.png",
        label_names={1: "shell", 2: "core", 3: "never present"},
    )
    assert out == tmp_path / "out" / "overlay.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = mpimg.imread(out)
    assert 200 < png.shape[0] < 1500 and 300 < png.shape[1] < 2500
    assert _pixels_of(png, class_colour(1)) > 20
    assert _pixels_of(png, class_colour(2)) > 20
    assert _pixels_of(png, class_colour(3)) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.png"]  # no temporary left behind

    fig = overlay_figure(case["image"], case["seg"], label_names={1: "shell", 2: "core", 3: "never present"})
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["shell", "core"]


def test_panels_follow_anatomy_not_storage_order(tmp_path: Path) -> None:
    """A blob at the patient's right-anterior-superior, stored LPS, must land where a radiologist expects."""
    affine = _lps_affine((1.0, 1.0, 1.0))
    shape = (30, 30, 30)
    # LPS storage: low i = patient's right, low j = anterior, high k = superior.
    seg = _ball(shape, (7, 7, 22), 3.0, (1.0, 1.0, 1.0)).astype(np.uint8)
    image = _save(tmp_path / "img.nii", np.ones(shape, np.float32), affine)
    fig = overlay_figure(image, _save(tmp_path / "seg.nii", seg, affine))
    axial, coronal, sagittal = fig.axes[:3]

    def blob_centre(ax) -> tuple[float, float]:  # (row, column) as fractions of the panel, 0 = top/left
        alpha = np.asarray(ax.images[1].get_array())[..., 3]
        rows, cols = np.nonzero(alpha)
        return rows.mean() / alpha.shape[0], cols.mean() / alpha.shape[1]

    row, col = blob_centre(axial)
    assert row < 0.5 and col < 0.5  # anterior up, patient's right on the viewer's left
    row, col = blob_centre(coronal)
    assert row < 0.5 and col < 0.5  # superior up, right on the left
    row, col = blob_centre(sagittal)
    assert row < 0.5 and col < 0.5  # superior up, anterior on the left


def test_label_row_and_dice_in_title(case: dict[str, Path], tmp_path: Path) -> None:
    fig = overlay_figure(case["image"], case["seg"], label=case["seg"], title="case 7")
    assert fig.get_suptitle() == "case 7 — mean Dice 1.00"
    assert len(fig.axes) == 6
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["Ground truth", "Prediction"]

    out = save_overlay(case["image"], case["seg"], tmp_path / "gt.png", label=case["seg"])
    assert (
        mpimg.imread(out).shape[0]
        > mpimg.imread(save_overlay(case["image"], case["seg"], tmp_path / "pred.png")).shape[0]
    )


def test_mean_dice() -> None:
    truth = np.zeros((4, 4, 4), np.int32)
    truth[:2, :2, :2] = 1  # 8 voxels
    pred = np.zeros_like(truth)
    pred[:1, :2, :2] = 1  # 4 of them
    pred[3, 3, 3] = 2  # a class the truth lacks scores 0
    assert mean_dice(pred, truth) == pytest.approx((2 * 4 / 12 + 0.0) / 2)
    assert mean_dice(truth, truth) == 1.0
    assert mean_dice(np.zeros_like(truth), np.zeros_like(truth)) is None


def test_shape_mismatch_names_both_files(case: dict[str, Path], tmp_path: Path) -> None:
    small = _save(tmp_path / "small_seg.nii.gz", np.zeros((20, 20, 8), np.uint8), _lps_affine(SPACING))
    with pytest.raises(ValueError, match=re.escape("small_seg.nii.gz")) as err:
        save_overlay(case["image"], small, tmp_path / "x.png")
    assert "image.nii.gz" in str(err.value) and "(20, 20, 8)" in str(err.value)
    with pytest.raises(ValueError, match=re.escape("small_seg.nii.gz")):
        save_overlay(case["image"], case["seg"], tmp_path / "x.png", label=small)
    assert not (tmp_path / "x.png").exists()


def test_panel_extent_reflects_anisotropic_spacing() -> None:
    # Coronal panel of a 1 x 1 x 3 mm volume: rows are z (3 mm), columns x (1 mm).
    left, right, bottom, top = panel_extent((20, 50), row_mm=3.0, col_mm=1.0)
    assert (right - left, bottom - top) == (50.0, 60.0)
    assert top == 0.0  # origin upper: row 0 (superior) drawn at the top


def test_rendered_coronal_panel_has_physical_proportions(tmp_path: Path) -> None:
    shape, spacing = (50, 40, 20), (1.0, 1.0, 3.0)
    affine = np.diag([*spacing, 1.0])
    image = _save(tmp_path / "img.nii.gz", np.ones(shape, np.float32), affine)
    seg = _save(tmp_path / "seg.nii.gz", np.zeros(shape, np.uint8), affine)
    fig = overlay_figure(image, seg)
    fig.draw_without_rendering()  # applies the equal-aspect constraint to the axes boxes
    coronal = fig.axes[1]
    assert coronal.images[0].get_extent() == pytest.approx((0, 50, 60, 0))
    box = coronal.get_position()
    width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    assert height_in / width_in == pytest.approx(60 / 50, rel=0.02)


def test_intensity_window() -> None:
    assert intensity_window(np.zeros((2, 2, 2)), "CT") == (-160.0, 240.0)
    mri = np.zeros((10, 10, 10), np.float32)
    mri[:5] = np.linspace(10.0, 1000.0, 500).reshape(5, 10, 10)
    low, high = intensity_window(mri, "MRI")
    assert 10.0 <= low < 20.0 and 990.0 < high <= 1000.0  # zeros (air / padding) don't drag the floor down


def test_class_colours_are_fixed_and_strong() -> None:
    red, green, blue = class_colour(1)
    assert red > 0.8 and green < 0.3 and blue < 0.4
    assert class_colour(2) != class_colour(1)
    with pytest.raises(ValueError):
        class_colour(0)
