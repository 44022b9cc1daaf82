"""Colour-mapped overlays of segmentations on their images, for eyeballing results.

Everything is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so rendering from data-loader
workers, MLflow callbacks or threads never touches global backend or figure state.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.io.atomic import atomic_write

# Fixed, high-contrast colours by class index (index 1 first), so that a class looks the same in every
# picture. Picked from a qualitative palette for visibility on a grey image; indices past the end wrap.
PALETTE: tuple[str, ...] = (
    "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#bfef45", "#469990", "#9a6324", "#fabed4", "#800000", "#aaffc3", "#808000", "#dcbeff",
)  # fmt: skip
CT_WINDOW: tuple[float, float] = (40.0, 400.0)  # soft-tissue level and width, HU
FILL_ALPHA = 0.4
DPI = 100
PANEL_HEIGHT_IN = 3.2

# Cut axis (in RAS) -> (panel name, row axis, column axis, edge letters top/bottom/left/right).
# Radiological convention: patient's right on the viewer's left, anterior up (axial), superior up.
_VIEWS: tuple[tuple[int, str, int, int, str], ...] = (
    (2, "Axial", 1, 0, "APRL"),
    (1, "Coronal", 2, 0, "SIRL"),
    (0, "Sagittal", 2, 1, "SIAP"),
)
# Axes-fraction positions of those letters: top, bottom, left, right.
_EDGES = ((0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"),
          (0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"))  # fmt: skip


def class_colour(index: int) -> tuple[float, float, float]:
    """RGB of a class, keyed on the index alone so colours never shift with which classes are present."""
    if index < 1:
        raise ValueError(f"class index must be >= 1 (0 is background), got {index}")
    return to_rgb(PALETTE[(index - 1) % len(PALETTE)])


def intensity_window(image: np.ndarray, modality: str = "MRI") -> tuple[float, float]:
    """CT has calibrated HU, so a fixed window works; other modalities have arbitrary scales."""
    if modality.upper() == "CT":
        level, width = CT_WINDOW
        return level - width / 2, level + width / 2
    values = image[np.isfinite(image) & (image != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean Dice over foreground classes in either volume; None when both are empty (Dice undefined)."""
    classes = np.union1d(np.unique(pred), np.unique(truth))
    scores = []
    for c in classes[classes != 0]:
        p, t = pred == c, truth == c
        scores.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else None


def focus_centre(*masks: np.ndarray | None) -> tuple[int, int, int]:
    """Centre of mass of the first mask with foreground, so the slices go through the structure."""
    given = [m for m in masks if m is not None]
    hits = [m for m in given if m.any()]
    centre = np.rint(np.argwhere(hits[0]).mean(axis=0)) if hits else np.array(given[0].shape[:3]) // 2
    i, j, k = (int(c) for c in centre)
    return i, j, k


def reslice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D panel from a RAS volume with row 0 at the top, oriented as in ``_VIEWS``."""
    if axis == 2:
        return volume[::-1, ::-1, index].T
    if axis == 1:
        return volume[::-1, index, ::-1].T
    return volume[index, ::-1, ::-1].T


def panel_extent(shape: Sequence[int], row_mm: float, col_mm: float) -> tuple[float, float, float, float]:
    """imshow extent in millimetres (origin upper): equal data aspect then gives true physical proportions."""
    n_rows, n_cols = shape
    return 0.0, n_cols * col_mm, n_rows * row_mm, 0.0


def _load(path: Path, *, labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (RAS) data and affine: storage order then no longer changes which way is up."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj)
    if labels:
        while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) from some writers
            data = data[..., 0]
        return np.rint(data).astype(np.int32), img.affine
    if data.ndim > 3:  # multi-channel image: show the first volume
        data = data.reshape(*data.shape[:3], -1)[..., 0]
    return data.astype(np.float32), img.affine


def _check_match(
    image_path: Path,
    image: np.ndarray,
    affine: np.ndarray,
    other_path: Path,
    other: np.ndarray,
    other_affine: np.ndarray,
) -> None:
    """Fail loudly on shape mismatch; a differing affine only warns (often float noise from resampling)."""
    if other.shape != image.shape:
        raise ValueError(
            f"{other_path} has shape {other.shape} but image {image_path} has shape {image.shape} "
            "(after reorienting both to RAS); resample the segmentation to the image grid first"
        )
    if not np.allclose(affine, other_affine, atol=1e-2):
        warnings.warn(f"{other_path} and {image_path} have different affines", stacklevel=3)


def _fill_rgba(mask: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Translucent colour layer; background stays fully transparent."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    for c in classes:
        rgba[mask == c] = (*class_colour(c), FILL_ALPHA)
    return rgba


def _draw_panel(
    ax: Axes,
    plane: np.ndarray,
    mask: np.ndarray,
    extent: tuple[float, float, float, float],
    window: tuple[float, float],
    letters: str,
) -> None:
    """Image, colour fill and opaque contours: contours keep the boundary readable where fill washes out."""
    ax.imshow(plane, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, aspect="equal")
    classes = [int(c) for c in np.unique(mask) if c != 0]
    ax.imshow(_fill_rgba(mask, classes), extent=extent, aspect="equal", interpolation="nearest")
    row_mm, col_mm = extent[2] / mask.shape[0], extent[1] / mask.shape[1]
    xs, ys = (np.arange(mask.shape[1]) + 0.5) * col_mm, (np.arange(mask.shape[0]) + 0.5) * row_mm
    for c in classes:
        if 0 < (hit := mask == c).sum() < hit.size:
            ax.contour(xs, ys, hit.astype(np.float32), levels=[0.5], colors=[class_colour(c)], linewidths=1.2)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 8, "fontweight": "bold"}
    for (x, y, ha, va), letter in zip(_EDGES, letters, strict=True):
        ax.text(x, y, letter, ha=ha, va=va, **style)


def overlay_figure(
    image: str | Path,
    seg: str | Path,
    *,
    label: str | Path | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str | None = None,
    modality: str = "MRI",
) -> Figure:
    """The figure ``save_overlay`` writes, for callers that embed it elsewhere (notebooks, MLflow)."""
    image, seg = Path(image), Path(seg)
    volume, affine = _load(image, labels=False)
    pred, pred_affine = _load(seg, labels=True)
    _check_match(image, volume, affine, seg, pred, pred_affine)
    rows: list[tuple[str, np.ndarray]] = [("Prediction", pred)]
    truth = None
    if label is not None:
        truth, truth_affine = _load(Path(label), labels=True)
        _check_match(image, volume, affine, Path(label), truth, truth_affine)
        rows.insert(0, ("Ground truth", truth))
    centre = focus_centre(truth, pred) if truth is not None else focus_centre(pred)
    heading = title or image.name.removesuffix(".gz").removesuffix(".nii")
    if truth is not None:
        dice = mean_dice(pred, truth)
        heading += f" — mean Dice {dice:.2f}" if dice is not None else " — mean Dice n/a (no foreground)"
    fig = _render(volume, rows, centre, nib.affines.voxel_sizes(affine)[:3], modality)
    fig.suptitle(heading, fontsize=11)
    present = sorted({int(c) for _, m in rows for c in np.unique(m) if c != 0})
    _add_legend(fig, present, label_names or {})
    return fig


def _render(
    volume: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray]],
    centre: Sequence[int],
    spacing: Sequence[float],
    modality: str,
) -> Figure:
    """Grid of panels sized by physical extent, so anisotropic volumes are not squashed."""
    window = intensity_window(volume, modality)
    extents = [panel_extent(reslice(volume, a, centre[a]).shape, spacing[r], spacing[c])
               for a, _, r, c, _ in _VIEWS]  # fmt: skip
    widths = [e[1] for e in extents]
    scale = PANEL_HEIGHT_IN / max(e[2] for e in extents)  # inches per mm
    figsize = (sum(widths) * scale + 1.2, len(rows) * PANEL_HEIGHT_IN + 1.2)
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False, gridspec_kw={"width_ratios": widths})
    for (row_name, mask), row_axes in zip(rows, axes, strict=True):
        for ax, (axis, name, _, _, letters), extent in zip(row_axes, _VIEWS, extents, strict=True):
            plane = reslice(volume, axis, centre[axis])
            _draw_panel(ax, plane, reslice(mask, axis, centre[axis]), extent, window, letters)
            ax.set_title(f"{name}  [{centre[axis]}/{volume.shape[axis] - 1}]", fontsize=9)
        if len(rows) > 1:
            row_axes[0].set_ylabel(row_name, fontsize=10)
    return fig


def _add_legend(fig: Figure, classes: Sequence[int], names: Mapping[int, str]) -> None:
    """Only classes actually drawn get an entry: a legend listing absent classes would mislead."""
    if not classes:
        return
    handles = [Patch(facecolor=class_colour(c), edgecolor=class_colour(c), label=names.get(c, f"class {c}"))
               for c in classes]  # fmt: skip
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False, fontsize=9
    )


def save_overlay(
    image: str | Path,
    seg: str | Path,
    out_png: str | Path,
    *,
    label: str | Path | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str | None = None,
    modality: str = "MRI",
) -> Path:
    """Render axial/coronal/sagittal overlays to a PNG, atomically so watchers never read half a file."""
    fig = overlay_figure(image, seg, label=label, label_names=label_names, title=title, modality=modality)
    with atomic_write(out_png) as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    return Path(out_png)
