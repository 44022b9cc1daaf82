"""The one same-grid check: what it accepts (round-off) and what it refuses (any real misplacement)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_series

from pipeline.io.geometry import GRID_TOLERANCE, Grid, grid_mismatch, same_grid, shape_mismatch
from pipeline.io.readers import InputReader

SHAPE = (12, 10, 8)


def oblique_affine(spacing=(0.8, 0.8, 2.5), origin=(-250.123456, 180.5, -310.75)) -> np.ndarray:
    """A rotated grid far from the origin: the case where round-off is largest."""
    angle = np.deg2rad(17.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def test_a_grid_is_its_own_grid() -> None:
    grid = Grid(SHAPE, oblique_affine())
    assert same_grid(grid, grid)
    assert grid_mismatch(grid, grid) is None


def test_float32_round_off_is_the_same_grid(tmp_path: Path) -> None:
    """NIfTI stores the affine as float32: a volume written and read back lies on its original grid."""
    affine = oblique_affine()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine), tmp_path / "label.nii.gz")
    stored = nib.load(tmp_path / "label.nii.gz").affine
    assert not np.array_equal(stored, affine), "float32 did round the affine"
    assert same_grid(Grid(SHAPE, stored), Grid(SHAPE, affine))
    rounded = affine.astype(np.float32).astype(np.float64)
    assert same_grid(Grid(SHAPE, rounded), Grid(SHAPE, affine))


def test_a_shifted_origin_is_another_grid() -> None:
    affine = oblique_affine()
    moved = affine.copy()
    moved[0, 3] += 0.5
    problem = grid_mismatch(Grid(SHAPE, moved), Grid(SHAPE, affine))
    assert problem == "origin shifted by 0.5x0x0 mm"
    assert not same_grid(Grid(SHAPE, moved), Grid(SHAPE, affine))


def test_a_shift_just_inside_the_tolerance_passes_and_just_outside_fails() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # origin 0: the tolerance is its absolute floor, in mm
    inside, outside = affine.copy(), affine.copy()
    inside[2, 3], outside[2, 3] = 0.5 * GRID_TOLERANCE, 2 * GRID_TOLERANCE
    assert same_grid(Grid(SHAPE, inside), Grid(SHAPE, affine))
    assert not same_grid(Grid(SHAPE, outside), Grid(SHAPE, affine))


def test_a_flipped_axis_is_another_grid() -> None:
    """LPS read as RAS: same spacing and, at origin 0, the same origin; only the directions differ."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    flipped = np.diag([-0.8, -0.8, 2.5, 1.0])
    assert grid_mismatch(Grid(SHAPE, flipped), Grid(SHAPE, affine)) == "direction cosines differ by up to 2"


def test_other_spacing_and_shape_are_named() -> None:
    affine = oblique_affine()
    coarser = oblique_affine(spacing=(0.8, 0.8, 3.0))
    assert grid_mismatch(Grid(SHAPE, coarser), Grid(SHAPE, affine)) == "spacing 0.8x0.8x3 mm, not 0.8x0.8x2.5"
    assert (
        grid_mismatch(Grid((12, 10, 7), affine), Grid(SHAPE, affine)) == "shape 12x10x7 differs from 12x10x8"
    )
    assert shape_mismatch(SHAPE, SHAPE) is None


@pytest.mark.parametrize("dims", [2, 4])
def test_grids_of_any_dimension(dims: int) -> None:
    affine = np.diag([0.5] * dims + [1.0])
    moved = affine.copy()
    moved[0, -1] = 1.0
    shape = (4,) * dims
    assert same_grid(Grid(shape, affine), Grid(shape, affine))
    assert "origin shifted by 1" in grid_mismatch(Grid(shape, moved), Grid(shape, affine))
    assert grid_mismatch(Grid(shape, np.eye(4)), Grid(shape, affine)) is not None


def test_a_degenerate_affine_is_never_the_same_grid() -> None:
    broken = np.diag([0.0, 1.0, 1.0, 1.0])
    assert not same_grid(Grid(SHAPE, broken), Grid(SHAPE, np.eye(4)))


def test_channels_off_one_grid_are_not_stacked(tmp_path: Path) -> None:
    """The reader applies the same check to the series it stacks as channels (multi-modal MRI)."""
    volume = np.random.default_rng(0).integers(0, 1000, (8, 6, 4)).astype(np.int16)
    first, second, moved = tmp_path / "t1", tmp_path / "t2", tmp_path / "flair"
    write_series(first, volume)
    write_series(second, volume)
    write_series(moved, volume, origin=(-99.0, -120, 50))  # 1 mm off: another grid
    reader = InputReader()
    stacked, _ = reader.get_data(reader.read([str(first), str(second)]))
    assert stacked.shape == (2, 8, 6, 4)
    with pytest.raises(ValueError, match=r"flair is not on the voxel grid of .*t1 \(origin shifted by"):
        reader.get_data(reader.read([str(first), str(moved)]))
