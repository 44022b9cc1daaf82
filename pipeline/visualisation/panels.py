"""One picture panel: a slice resampled to display pixels, windowed, with a colour fill and outlines.

Slicing comes first and everything after it works on 2D arrays of display size, so the cost of a
picture does not grow with the volume. The panel is composed here as RGB pixels (not with matplotlib's
``contour``/``imshow`` resampling): fill and outline then sit on exactly the pixels of the
segmentation, at any DPI, and a figure of many panels renders in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import to_rgb

# Fixed, high-contrast colours by class index (index 1 first), so that a class looks the same in every
# picture. Picked from a qualitative palette for visibility on a grey image; indices past the end wrap.
PALETTE: tuple[str, ...] = (
    "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#bfef45", "#469990", "#9a6324", "#fabed4", "#800000", "#aaffc3", "#808000", "#dcbeff",
)  # fmt: skip
CT_WINDOW: tuple[float, float] = (40.0, 400.0)  # soft-tissue level and width, HU
MRI_PERCENTILES: tuple[float, float] = (0.5, 99.5)  # of the non-zero voxels: air and padding excluded
WINDOW_SAMPLES = 2_000_000  # voxels looked at for the MRI window (a strided subsample of larger volumes)
FILL_ALPHA = 0.4
MAX_SCANNED_CLASS = 64  # label maps up to this index are scanned class by class, others sorted once


@dataclass(frozen=True)
class View:
    """A cut through a RAS volume, shown in radiological convention (patient's right on the left)."""

    name: str
    axis: int  # the RAS axis the cut is across
    row_axis: int  # the RAS axis running down the panel
    col_axis: int  # the RAS axis running across it
    letters: str  # anatomical direction at the top, bottom, left, right edges


VIEWS: tuple[View, ...] = (
    View("Axial", 2, 1, 0, "APRL"),
    View("Coronal", 1, 2, 0, "SIRL"),
    View("Sagittal", 0, 2, 1, "SIAP"),
)
AXIAL = VIEWS[0]


@dataclass(frozen=True)
class Structure:
    voxels: int
    centre: tuple[int, int, int]  # RAS voxel index whose three slices all cut the structure
    box: tuple[tuple[int, int], ...]  # (first, last) voxel index holding it, per axis


def class_colour(index: int) -> tuple[float, float, float]:
    """RGB of a class, keyed on the index alone so colours never shift with which classes are present."""
    if index < 1:
        raise ValueError(f"class index must be >= 1 (0 is background), got {index}")
    return to_rgb(PALETTE[(index - 1) % len(PALETTE)])


def colour_table(max_class: int) -> np.ndarray:
    """Row c = colour of class c (row 0 unused), so a label slice is coloured by one fancy index."""
    table = np.zeros((max_class + 1, 3), dtype=np.float32)
    for index in range(1, max_class + 1):
        table[index] = class_colour(index)
    return table


def intensity_window(image: np.ndarray, modality: str = "MRI") -> tuple[float, float]:
    """CT has calibrated HU, so a fixed window works; other modalities have arbitrary scales."""
    if modality.upper() == "CT":
        level, width = CT_WINDOW
        return level - width / 2, level + width / 2
    step = max(1, int(np.ceil((image.size / WINDOW_SAMPLES) ** (1 / 3))))
    sample = np.asarray(image[::step, ::step, ::step], dtype=np.float32)
    values = sample[np.isfinite(sample) & (sample != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, MRI_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def structures(labels: np.ndarray) -> dict[int, Structure]:
    """Voxel count, centre and bounding box of each class present.

    One comparison per candidate class (no full-size integer temporaries, as ``np.unique`` or
    ``np.bincount`` would make). The centre is the centre of mass, moved along an axis to the nearest
    slice holding the class if its own slice does not (two kidneys as one class: the centre of mass
    lies between them).
    """
    found = {}
    for c in _candidate_classes(labels):
        mask = labels == c
        in_12 = mask.sum(axis=0)
        voxels = int(in_12.sum())
        if voxels:
            profiles = (mask.sum(axis=(1, 2)), in_12.sum(axis=1), in_12.sum(axis=0))
            centre = tuple(_centre_slice(p) for p in profiles)
            box = tuple((int(np.flatnonzero(p)[0]), int(np.flatnonzero(p)[-1])) for p in profiles)
            found[c] = Structure(voxels, centre, box)  # type: ignore[arg-type]
    return found


def _candidate_classes(labels: np.ndarray) -> list[int]:
    top = int(labels.max()) if labels.size else 0
    if top <= MAX_SCANNED_CLASS:
        return list(range(1, top + 1))
    return [int(c) for c in np.unique(labels) if c > 0]  # sparse large indices: sorting is cheaper


def _centre_slice(profile: np.ndarray) -> int:
    """Centre of mass of a per-slice voxel count, snapped to the nearest slice that has voxels."""
    filled = np.flatnonzero(profile)
    mean = float((profile * np.arange(profile.size)).sum() / profile.sum())
    return int(filled[np.argmin(np.abs(filled - mean))])


def class_dice(
    pred: np.ndarray, truth: np.ndarray, in_pred: Mapping[int, Structure], in_truth: Mapping[int, Structure]
) -> dict[int, float]:
    """Dice of every class in either volume (``structures`` of each); a class in only one scores 0.

    Voxel counts are already known, so only the overlap of the two bounding boxes is compared.
    """
    scores = {}
    for c in sorted(set(in_pred) | set(in_truth)):
        p, t = in_pred.get(c), in_truth.get(c)
        overlap = 0
        if p is not None and t is not None:
            box = tuple(
                slice(max(a[0], b[0]), min(a[1], b[1]) + 1) for a, b in zip(p.box, t.box, strict=True)
            )
            overlap = np.count_nonzero((pred[box] == c) & (truth[box] == c))
        scores[c] = 2.0 * overlap / ((p.voxels if p else 0) + (t.voxels if t else 0))
    return scores


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean Dice over foreground classes in either volume; None when both are empty (Dice undefined)."""
    scores = class_dice(pred, truth, structures(pred), structures(truth))
    return float(np.mean(list(scores.values()))) if scores else None


def reslice(volume: np.ndarray, view: View, index: int) -> np.ndarray:
    """2D panel of a RAS volume with row 0 at the top, oriented as ``view`` says (a view, no copy)."""
    if view.axis == 2:
        return volume[::-1, ::-1, index].T
    if view.axis == 1:
        return volume[::-1, index, ::-1].T
    return volume[index, ::-1, ::-1].T


def display_shape(
    plane_shape: tuple[int, int], spacing_mm: tuple[float, float], px_per_mm: float
) -> tuple[int, int]:
    """Pixels for a slice at a common scale: physical proportions whatever the voxel spacing."""
    rows, cols = (max(1, round(n * mm * px_per_mm)) for n, mm in zip(plane_shape, spacing_mm, strict=True))
    return rows, cols


def _positions(n_in: int, n_out: int) -> np.ndarray:
    """Where each display pixel centre falls in voxel coordinates (voxel centres at 0, 1, ...)."""
    return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5


def resample_nearest(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label slices: every display pixel shows the class of the voxel it lies in (no invented classes)."""
    rows, cols = (np.clip(np.floor(_positions(n, m) + 0.5), 0, n - 1).astype(int)
                  for n, m in zip(plane.shape, shape, strict=True))  # fmt: skip
    return plane[np.ix_(rows, cols)]


def resample_linear(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Image slices: bilinear, on the same pixel grid as ``resample_nearest``."""
    out = np.asarray(plane, dtype=np.float32)
    for axis, (n, m) in enumerate(zip(plane.shape, shape, strict=True)):
        u = np.clip(_positions(n, m), 0, n - 1)
        low = np.floor(u).astype(int)
        high = np.minimum(low + 1, n - 1)
        weight = (u - low).astype(np.float32)
        weight = weight[:, None] if axis == 0 else weight[None, :]
        a, b = np.take(out, low, axis=axis), np.take(out, high, axis=axis)
        out = a + (b - a) * weight
    return out


def outline(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels of a class within ``width`` of a different class: the boundary, drawn inside each class."""
    differs = np.zeros(labels.shape, dtype=bool)
    for s in range(1, width + 1):
        down = labels[s:, :] != labels[:-s, :]
        differs[s:, :] |= down
        differs[:-s, :] |= down
        across = labels[:, s:] != labels[:, :-s]
        differs[:, s:] |= across
        differs[:, :-s] |= across
    return differs & (labels > 0)


def compose(
    gray: np.ndarray, labels: np.ndarray, window: tuple[float, float], table: np.ndarray, edge_px: int
) -> np.ndarray:
    """RGB (float 0..1) of a windowed slice under a translucent class fill and opaque class outlines."""
    low, high = window
    shade = np.clip((gray - low) / (high - low), 0.0, 1.0)
    rgb = np.repeat(shade[..., None], 3, axis=2)
    inside = labels > 0
    colours = table[np.minimum(labels, len(table) - 1)]
    rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colours[inside]
    edge = outline(labels, edge_px)
    rgb[edge] = colours[edge]
    return rgb


def label_text(index: int, names: Mapping[int, str]) -> str:
    return names.get(index, f"class {index}")
