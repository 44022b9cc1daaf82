"""Overlays from real NIfTI files (and a DICOM series) on disk: what a user would point save_overlay at.

The geometry tests read the PNG back and map coloured pixels to millimetres independently of the
code under test, from the affine alone, on a volume stored neither in RAS order nor isotropic.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_factory import expected_affine, write_series
from monai.data import MetaTensor
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from pipeline.cli import main
from pipeline.tracking.handlers import draw_example
from pipeline.visualisation import save_overlay
from pipeline.visualisation.overlay import (
    PANEL_IN,
    class_colour,
    intensity_window,
    mean_dice,
    overlay_canvas,
    overlay_figure,
)

# Stored axes (S, L, P): axis 0 runs inferior -> superior at 3 mm, axis 1 right -> left at 0.7 mm
# (world x falls), axis 2 anterior -> posterior at 1.1 mm (world y falls). Nothing here is RAS.
AFFINE = np.array([[0.0, -0.7, 0.0, 10.0], [0.0, 0.0, -1.1, 20.0], [3.0, 0.0, 0.0, -30.0], [0, 0, 0, 1]])
SHAPE = (12, 50, 40)  # 36 mm superior-inferior, 35 mm left-right, 44 mm anterior-posterior
BOX = (slice(3, 8), slice(10, 25), slice(5, 20))  # class 1, in stored indices


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


@pytest.fixture
def box_case(tmp_path: Path) -> dict[str, Path]:
    image = np.random.default_rng(0).normal(100.0, 5.0, SHAPE).astype(np.float32)
    seg = np.zeros(SHAPE, np.uint8)
    seg[BOX] = 1
    return {"image": _save(tmp_path / "image.nii.gz", image), "seg": _save(tmp_path / "seg.nii.gz", seg)}


def _world_range(box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """World-space extent (min, max per RAS axis) of voxels ``box``, edges included (±half a voxel)."""
    corners = np.array(np.meshgrid(*[(s.start - 0.5, s.stop - 0.5) for s in box], indexing="ij")).reshape(
        3, -1
    )
    world = (AFFINE[:3, :3] @ corners).T + AFFINE[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _expected_pixels(view: str, panel_w: int, panel_h: int) -> tuple[float, float, float, float]:
    """Row and column span, in panel pixels, where the box must appear in a radiological display."""
    low, high = _world_range(tuple(slice(0, n) for n in SHAPE))
    box_low, box_high = _world_range(BOX)
    # (world axis down the rows, across the columns); top: anterior/superior, left: the patient's right
    rows_axis, cols_axis = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[view]

    def span(axis: int, pixels: int) -> tuple[float, float]:  # from the high (top/left) world end
        size = high[axis] - low[axis]
        return (high[axis] - box_high[axis]) / size * pixels, (high[axis] - box_low[axis]) / size * pixels

    return *span(rows_axis, panel_h), *span(cols_axis, panel_w)


def _red(png: np.ndarray) -> np.ndarray:
    """Pixels tinted by class 1 (red fill or outline); grey image and yellow letters are not."""
    return png[..., 0] - png[..., 1] > 0.15


def test_box_on_a_non_ras_anisotropic_volume_lands_where_it_is(
    box_case: dict[str, Path], tmp_path: Path
) -> None:
    png = mpimg.imread(save_overlay(box_case["image"], box_case["seg"], tmp_path / "box.png"))
    panels = overlay_canvas(box_case["image"], box_case["seg"]).panels
    assert len(panels) == 3  # one structure: one row of axial, coronal, sagittal
    for view, (left, top, width, height) in zip(("axial", "coronal", "sagittal"), panels, strict=True):
        rows, cols = np.nonzero(_red(png[top : top + height, left : left + width]))
        row_lo, row_hi, col_lo, col_hi = _expected_pixels(view, width, height)
        assert rows.min() == pytest.approx(row_lo, abs=1.5), view
        assert rows.max() + 1 == pytest.approx(row_hi, abs=1.5), view
        assert cols.min() == pytest.approx(col_lo, abs=1.5), view
        assert cols.max() + 1 == pytest.approx(col_hi, abs=1.5), view
    assert not _red(png[:, : panels[0][0]]).any()  # no red outside the panels (the legend is at the bottom)


@pytest.mark.parametrize("dpi", [100, 150])
def test_pixel_size_follows_dpi_and_physical_extent(
    box_case: dict[str, Path], tmp_path: Path, dpi: int
) -> None:
    canvas = overlay_canvas(box_case["image"], box_case["seg"], dpi=dpi)
    png = mpimg.imread(save_overlay(box_case["image"], box_case["seg"], tmp_path / "size.png", dpi=dpi))
    assert png.shape[:2] == (canvas.height, canvas.width)
    px_per_mm = PANEL_IN * dpi / 44.0  # the longest side of any panel: 44 mm anterior-posterior
    # (width, height) in mm: axial x by y, coronal x by z, sagittal y by z
    for (_, _, width, height), (w_mm, h_mm) in zip(
        canvas.panels, [(35, 44), (35, 36), (44, 36)], strict=True
    ):
        assert width == pytest.approx(w_mm * px_per_mm, abs=0.51)
        assert height == pytest.approx(h_mm * px_per_mm, abs=0.51)


def _two_class_case(tmp_path: Path) -> dict[str, Path]:
    """Truth: a ball (1) with a core (2). Prediction: the ball shifted, the core, and a stray class 4."""
    shape, affine = (30, 30, 20), np.diag([1.0, 1.0, 2.0, 1.0])
    truth = _ball(shape, (15, 15, 10), 8).astype(np.uint8) + _ball(shape, (15, 15, 10), 3)
    pred = _ball(shape, (17, 15, 10), 8).astype(np.uint8) + _ball(shape, (15, 15, 10), 3)
    pred[2:4, 2:4, 2:4] = 4
    image = np.random.default_rng(1).normal(300, 20, shape).astype(np.float32)
    return {
        "image": _save(tmp_path / "case_7.nii.gz", image, affine),
        "truth": _save(tmp_path / "truth.nii.gz", truth, affine),
        "pred": _save(tmp_path / "pred.nii.gz", pred, affine),
    }


def test_title_dice_equals_monai_dice(tmp_path: Path) -> None:
    case = _two_class_case(tmp_path)
    fig = overlay_figure(case["image"], case["pred"], label=case["truth"], label_names={1: "ball", 2: "core"})
    truth, pred = (torch.as_tensor(nib.load(case[k]).get_fdata())[None, None] for k in ("truth", "pred"))
    per_class = compute_dice(
        one_hot(pred, 5), one_hot(truth, 5), include_background=False, ignore_empty=False
    )
    expected = float(per_class[0, [0, 1, 3]].mean())  # classes 1, 2, 4: present in either (3 in neither)
    title = fig.texts[[t.get_text().startswith("case_7") for t in fig.texts].index(True)].get_text()
    assert float(re.fullmatch(r"case_7 — mean Dice (\d\.\d{3})", title).group(1)) == pytest.approx(
        expected, abs=5e-4
    )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"ball · Dice {float(per_class[0, 0]):.2f}", "core · Dice 1.00", "class 4 · Dice 0.00"]
    assert mean_dice(
        nib.load(case["pred"]).get_fdata(), nib.load(case["truth"]).get_fdata()
    ) == pytest.approx(expected)


def test_legend_patches_wear_the_palette_colours_of_present_classes(tmp_path: Path) -> None:
    case = _two_class_case(tmp_path)
    out = save_overlay(case["image"], case["pred"], tmp_path / "o.png", label_names={1: "ball", 3: "absent"})
    fig = overlay_figure(case["image"], case["pred"], label_names={1: "ball", 3: "absent"})
    patches = fig.legends[0].get_patches()
    assert [p.get_label() for p in patches] == ["ball", "class 2", "class 4"]
    for patch, index in zip(patches, (1, 2, 4), strict=True):
        assert patch.get_facecolor()[:3] == pytest.approx(class_colour(index))
    png = mpimg.imread(out)[..., :3]
    for index, present in ((1, True), (2, True), (4, True), (3, False)):
        exact = (np.abs(png - np.asarray(class_colour(index))) < 1.5 / 255).all(axis=-1)
        assert exact.any() == present, index  # outlines and legend patches are drawn in the pure colour


def test_truth_and_prediction_side_by_side(tmp_path: Path) -> None:
    case = _two_class_case(tmp_path)
    canvas = overlay_canvas(case["image"], case["pred"], label=case["truth"])
    headers = [t.get_text() for t in canvas.figure.texts if " · " in t.get_text() and "/" in t.get_text()]
    # the core lies inside the ball in every view: one row, through the ball; class 4 gets its own
    assert len(canvas.panels) == 2 * 6
    assert [h.split(" · ")[1] for h in headers[:6]] == ["truth", "prediction"] * 3
    assert {t.get_text() for t in canvas.figure.texts if t.get_text().startswith("centre of")} == {
        "centre of class 1",
        "centre of class 4",
    }


def test_each_far_apart_structure_gets_a_row_through_its_centre(tmp_path: Path) -> None:
    shape = (40, 40, 40)
    seg = np.zeros(shape, np.uint8)
    seg[4:10, 4:10, 30:36] = 1  # centre (6.5 -> snapped, ...)
    seg[28:34, 26:30, 4:8] = 2
    seg[20, 20, 20] = 3
    image = _save(tmp_path / "i.nii.gz", np.ones(shape, np.float32), np.eye(4))
    seg_path = _save(tmp_path / "s.nii.gz", seg, np.eye(4))
    headers = [t.get_text() for t in overlay_figure(image, seg_path).texts if "/39" in t.get_text()]
    axial = [int(h.split()[1].split("/")[0]) for h in headers[::3]]
    assert axial == [32, 5, 20]  # largest first: class 1 (216 voxels), class 2 (96), class 3 (1)
    fig = overlay_figure(image, seg_path, max_rows=2)
    assert any("1 smaller structure without a row: class 3" in t.get_text() for t in fig.texts)


def test_given_slice_in_stored_indices(box_case: dict[str, Path], tmp_path: Path) -> None:
    fig = overlay_figure(box_case["image"], box_case["seg"], slice_at=(2, 40, 30))
    headers = [t.get_text() for t in fig.texts if "/" in t.get_text()]
    # RAS order is (x, y, z) = (stored 1 reversed, stored 2 reversed, stored 0)
    assert headers == ["Axial 2/11", "Coronal 9/39", "Sagittal 9/49"]
    assert any(t.get_text() == "voxel (2, 40, 30)" for t in fig.texts)
    with pytest.raises(ValueError, match=r"voxel \(12, 0, 0\) is outside .*image\.nii\.gz"):
        overlay_figure(box_case["image"], box_case["seg"], slice_at=(12, 0, 0))


def test_dicom_series_input_gets_the_ct_window_and_no_identifier(tmp_path: Path) -> None:
    volume = np.full((24, 20, 6), 1064, np.int16)  # 40 HU after the factory's -1024 intercept
    write_series(tmp_path / "series", volume, spacing=(0.8, 0.8, 2.5))
    seg = np.zeros((24, 20, 6), np.uint8)
    seg[5:15, 5:12, 1:4] = 1
    seg_path = _save(tmp_path / "seg.nii.gz", seg, expected_affine((0.8, 0.8, 2.5), ras=True))
    out = tmp_path / "dicom.png"
    assert main(["overlay", str(tmp_path / "series"), str(seg_path), "-o", str(out)]) == 0
    canvas = overlay_canvas(tmp_path / "series", seg_path)
    left, top, width, height = canvas.panels[0]
    panel = mpimg.imread(out)[top : top + height, left : left + width, :3]
    grey = panel[np.ptp(panel, axis=-1) < 1e-6]  # not tinted by the segmentation
    assert np.median(grey) == pytest.approx(0.5, abs=0.01)  # 40 HU: the middle of the soft-tissue window
    texts = " ".join(t.get_text() for t in canvas.figure.texts)
    assert "Doe" not in texts and "PID" not in texts


def test_validation_example_from_memory(tmp_path: Path) -> None:
    """What the MLflow validation handler draws: channel-first MetaTensors, one-hot prediction."""
    truth = torch.zeros(1, 16, 16, 8)
    truth[0, 4:12, 4:12, 2:6] = 1
    example = {
        "image": MetaTensor(torch.rand(1, 16, 16, 8), affine=torch.diag(torch.tensor([2.0, 2.0, 4.0, 1.0]))),
        "label": truth,
        "pred": one_hot(truth[None], 2)[0],
    }
    png = draw_example(example, {1: "organ"}, tmp_path / "case0_epoch0005.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case0_epoch0005.png"]  # nothing else written


def test_cli_label_names_from_a_datalist_and_clear_errors(
    box_case: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    datalist = tmp_path / "d.json"
    datalist.write_text('{"labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"}}')
    out = tmp_path / "cli.png"
    args = [
        "overlay",
        str(box_case["image"]),
        str(box_case["seg"]),
        "--labels",
        str(datalist),
        "-o",
        str(out),
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main([*args[:3], "--labels", str(tmp_path / "bad.json"), "-o", str(out)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main([*args[:3], "--slice", "1", "2", "99", "-o", str(out)]) == 2
    assert "outside" in capsys.readouterr().err


def test_shape_mismatch_names_both_files(box_case: dict[str, Path], tmp_path: Path) -> None:
    small = _save(tmp_path / "small_seg.nii.gz", np.zeros((20, 20, 8), np.uint8))
    with pytest.raises(ValueError, match=re.escape("small_seg.nii.gz")) as err:
        save_overlay(box_case["image"], small, tmp_path / "x.png")
    assert "image.nii.gz" in str(err.value) and "(20, 8, 20)" in str(err.value)
    with pytest.raises(ValueError, match=re.escape("small_seg.nii.gz")):
        save_overlay(box_case["image"], box_case["seg"], tmp_path / "x.png", label=small)
    negative = _save(tmp_path / "negative.nii.gz", -np.ones(SHAPE, np.int16))
    with pytest.raises(ValueError, match=r"negative\.nii\.gz holds negative values"):
        save_overlay(box_case["image"], negative, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.nii\.gz"):
        save_overlay(box_case["image"], tmp_path / "nowhere.nii.gz", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


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
