"""Whether two volumes lie on one voxel grid: the one check, with one tolerance, that the data check,
the multi-channel reader, evaluation and the pictures share, so a case one accepts the others accept.

A grid is a shape and an affine (voxel indices to millimetres). Two grids are the same when the
shapes are equal and the affines agree within ``GRID_TOLERANCE``: relative in the spacing, relative
(with the same number as a floor in mm) in the origin, absolute in the direction cosines.

Why 1e-4: NIfTI stores its affine as float32 (about 6e-8 relative round-off) and DICOM writes
positions and orientations as decimal strings of up to 16 characters, so a volume written by another
tool, or read back through another library, differs from the original by far less; yet 1e-4 is only
0.03 mm at 300 mm from the origin (and 1e-4 rad of rotation is 0.03 mm there too), far below any
real misregistration, which is a fraction of a voxel (0.5 mm and up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

GRID_TOLERANCE = 1e-4


class Grid(NamedTuple):
    """A voxel grid: the spatial shape and the 4x4 voxel-to-world affine (mm)."""

    shape: Sequence[int]
    affine: np.ndarray


def grid_mismatch(grid: Grid, reference: Grid, tolerance: float = GRID_TOLERANCE) -> str | None:
    """What keeps ``grid`` off ``reference``'s voxel grid, in words (for error messages); None when
    they are the same grid."""
    different_shape = shape_mismatch(grid.shape, reference.shape)
    if different_shape:
        return different_shape
    a, b = np.asarray(reference.affine, dtype=float), np.asarray(grid.affine, dtype=float)
    if a.shape != b.shape:
        return f"a {b.shape[0] - 1}D affine, not {a.shape[0] - 1}D"
    # Any dimension (a 2D image's affine is 3x3): the linear part's columns, then the translation.
    spacing_a, spacing_b = np.linalg.norm(a[:-1, :-1], axis=0), np.linalg.norm(b[:-1, :-1], axis=0)
    problems = []
    if not np.allclose(spacing_b, spacing_a, rtol=tolerance, atol=0):
        problems.append(f"spacing {_xs(spacing_b)} mm, not {_xs(spacing_a)}")
    if not np.allclose(b[:-1, -1], a[:-1, -1], rtol=tolerance, atol=tolerance):
        problems.append(f"origin shifted by {_xs(b[:-1, -1] - a[:-1, -1])} mm")
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate axis: NaN, reported as differing
        turn = np.abs(b[:-1, :-1] / spacing_b - a[:-1, :-1] / spacing_a).max()
    if not turn <= tolerance:
        problems.append(f"direction cosines differ by up to {turn:.3g}")
    return "; ".join(problems) or None


def shape_mismatch(shape: Sequence[int], reference: Sequence[int]) -> str | None:
    """The shape part of ``grid_mismatch``, for a volume whose affine is too broken to compare."""
    shape, reference = tuple(int(s) for s in shape), tuple(int(s) for s in reference)
    return None if shape == reference else f"shape {_xs(shape)} differs from {_xs(reference)}"


def same_grid(grid: Grid, reference: Grid, tolerance: float = GRID_TOLERANCE) -> bool:
    """The same shape and, within ``tolerance`` (see the module docstring), the same affine."""
    return grid_mismatch(grid, reference, tolerance) is None


def _xs(values: Sequence[float] | np.ndarray) -> str:
    """``12x10x8`` for shapes, ``0.8x0.8x2.5`` for spacings and shifts."""
    return "x".join(str(v) if isinstance(v, (int, np.integer)) else f"{v:.4g}" for v in values)
