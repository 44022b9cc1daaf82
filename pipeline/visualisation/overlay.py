"""Colour overlays of a segmentation on its image: axial, coronal and sagittal slices through each structure.

Why rows through each structure: slices through the centre of everything segmented miss small or
lateral structures (a kidney, a lesion) entirely. Rows are planned largest structure first, and a
structure that all three slices of an earlier row already cut gets no row of its own, so nested or
neighbouring structures (grey and white matter, tumour core and oedema) share one row instead of
repeating nearly the same slices; at most ``MAX_ROWS`` rows, the structures left out named under the
title. With a ground truth, truth and prediction of each slice sit side by side, so a difference is
seen by looking one panel across rather than by telling two outlines apart; each class's Dice is in
the legend, the mean Dice in the title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.data.layouts import listing
from pipeline.io.names import case_name
from pipeline.visualisation.canvas import DPI, TEXT_LINE_IN, Canvas, legend_height_px, write_png
from pipeline.visualisation.panels import (
    PALETTE,
    VIEWS,
    Structure,
    View,
    class_colour,
    class_dice,
    colour_table,
    compose,
    display_shape,
    intensity_window,
    label_text,
    mean_dice,
    resample_linear,
    resample_nearest,
    reslice,
    structures,
)
from pipeline.visualisation.volumes import RasVolume, as_ras, check_same_grid, load_image, load_labels

__all__ = [
    "PALETTE",
    "class_colour",
    "draw_overlay",
    "intensity_window",
    "mean_dice",
    "overlay_canvas",
    "overlay_figure",
    "save_overlay",
    "save_overlay_arrays",
]

PANEL_IN = 3.2  # the longest side of the largest panel; the others keep their physical proportion
MAX_ROWS = 6
EDGE_IN = 0.02  # outline width
MARGIN_IN, HEADER_IN, ROW_LABEL_IN = 0.1, 0.22, 0.3
GAP_IN, VIEW_GAP_IN = 0.05, 0.18  # between truth and prediction of one view; between views


@dataclass(frozen=True)
class Row:
    name: str
    centre: tuple[int, int, int]  # RAS voxel index the three slices go through


@dataclass(frozen=True)
class Column:
    view: View
    kind: str  # "truth", "prediction", or "" when there is no truth to tell apart
    labels: np.ndarray


def overlay_canvas(
    image: str | Path,
    seg: str | Path,
    *,
    label: str | Path | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str | None = None,
    modality: str = "MRI",
    slice_at: Sequence[int] | None = None,
    max_rows: int = MAX_ROWS,
    dpi: int = DPI,
) -> Canvas:
    """The overlay of NIfTI files or DICOM series, with its panels' pixel boxes (``canvas.panels``).

    ``slice_at``: one row through this voxel (indices in the image file's stored order, as viewers
    show them) instead of one row per structure.
    """
    volume, pred = load_image(image), load_labels(seg)
    check_same_grid(volume, pred)
    truth = None
    if label is not None:
        truth = load_labels(label)
        check_same_grid(volume, truth)
    focus = None
    if slice_at is not None:
        focus = Row(f"voxel {tuple(int(v) for v in slice_at)}", volume.ras_index(slice_at))
    heading = title or case_name(Path(image))
    options = {"label_names": label_names, "title": heading, "modality": modality, "max_rows": max_rows}
    return draw_overlay(volume, pred, truth=truth, focus=focus, dpi=dpi, **options)


def overlay_figure(image: str | Path, seg: str | Path, **options: Any) -> Figure:
    """The figure ``save_overlay`` writes, for callers that embed it elsewhere (notebooks, MLflow)."""
    return overlay_canvas(image, seg, **options).figure


def save_overlay(
    image: str | Path,
    seg: str | Path,
    out_png: str | Path,
    *,
    label: str | Path | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str | None = None,
    modality: str = "MRI",
    slice_at: Sequence[int] | None = None,
    max_rows: int = MAX_ROWS,
    dpi: int = DPI,
) -> Path:
    """Render the overlay of NIfTI files or DICOM series to a PNG; returns its path.

    ``label``: the ground truth, shown beside the prediction, with per-structure and mean Dice.
    ``modality``: "CT" gets a fixed soft-tissue window, anything else percentiles of the image.
    """
    options = {"label_names": label_names, "title": title, "modality": modality, "max_rows": max_rows}
    return write_png(overlay_figure(image, seg, label=label, slice_at=slice_at, dpi=dpi, **options), out_png)


def save_overlay_arrays(
    image: np.ndarray,
    seg: np.ndarray,
    affine: np.ndarray,
    out_png: str | Path,
    *,
    label: np.ndarray | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str = "",
    modality: str = "MRI",
) -> Path:
    """The same picture from 3D arrays on one grid (a validation case in memory): no files to write."""
    volume = as_ras(np.asarray(image), affine, "image")
    pred = as_ras(np.rint(seg).astype(np.int32), affine, "prediction")
    truth = None if label is None else as_ras(np.rint(label).astype(np.int32), affine, "label")
    canvas = draw_overlay(volume, pred, truth=truth, label_names=label_names, title=title, modality=modality)
    return write_png(canvas.figure, out_png)


def draw_overlay(
    image: RasVolume,
    pred: RasVolume,
    *,
    truth: RasVolume | None = None,
    label_names: Mapping[int, str] | None = None,
    title: str = "",
    modality: str = "MRI",
    focus: Row | None = None,
    max_rows: int = MAX_ROWS,
    dpi: int = DPI,
) -> Canvas:
    """Rows of axial/coronal/sagittal panels; columns pair truth and prediction when there is a truth."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    in_pred = structures(pred.data)
    in_truth = structures(truth.data) if truth is not None else {}
    classes = sorted(set(in_pred) | set(in_truth))
    dice = class_dice(pred.data, truth.data, in_pred, in_truth) if truth is not None else {}
    names = dict(label_names or {})
    rows, headings = _rows(image, pred, truth, in_pred, in_truth, names, focus, max_rows)
    headings.insert(0, _heading(title, dice, truth))
    masks = [("truth", truth.data), ("prediction", pred.data)] if truth is not None else [("", pred.data)]
    columns = [Column(view, kind, labels) for view in VIEWS for kind, labels in masks]
    layout = _Layout(image, rows, columns, len(classes), len(headings), dpi)
    canvas = layout.draw(intensity_window(image.data, modality), colour_table(max(classes, default=0)))
    for line, text in enumerate(headings):
        y = canvas.px(MARGIN_IN + (line + 0.5) * TEXT_LINE_IN)
        canvas.text(canvas.width / 2, y, text, ha="center", va="center", fontsize=11 if line == 0 else 8)
    canvas.legend({c: _legend_text(c, names, dice) for c in classes})
    return canvas


def _rows(
    image: RasVolume,
    pred: RasVolume,
    truth: RasVolume | None,
    in_pred: Mapping[int, Structure],
    in_truth: Mapping[int, Structure],
    names: Mapping[int, str],
    focus: Row | None,
    max_rows: int,
) -> tuple[list[Row], list[str]]:
    """The rows to draw and a note naming the structures left without one (if any)."""
    if focus:
        return [focus], []
    # the truth's structure wins, so that a prediction's panels show the slices its truth is judged on
    reference = {c: pred.data for c in in_pred} | {c: truth.data for c in in_truth}  # type: ignore[union-attr]
    rows, left_out = plan_rows({**in_pred, **in_truth}, reference, names, max_rows)
    if not rows:
        return [Row("volume centre", tuple(n // 2 for n in image.data.shape))], []  # type: ignore[arg-type]
    if not left_out:
        return rows, []
    some = f"{len(left_out)} smaller structure{'s' * (len(left_out) > 1)}"
    return rows, [f"{some} without a row: {listing([label_text(c, names) for c in left_out], 8)}"]


def plan_rows(
    found: Mapping[int, Structure],
    reference: Mapping[int, np.ndarray],
    names: Mapping[int, str],
    max_rows: int = MAX_ROWS,
) -> tuple[list[Row], list[int]]:
    """Rows through structure centres, largest structure first; returns the rows and the classes left out.

    A structure that all three slices of an earlier row cut (in its ``reference`` label volume) gets
    no row of its own: it is already seen in every view.
    """
    rows: list[Row] = []
    left_out: list[int] = []
    for c in sorted(found, key=lambda c: -found[c].voxels):
        if any(_cuts(reference[c], c, row.centre) for row in rows):
            continue
        if len(rows) < max_rows:
            rows.append(Row(f"centre of {label_text(c, names)}", found[c].centre))
        else:
            left_out.append(c)
    return rows, left_out


def _cuts(labels: np.ndarray, c: int, centre: tuple[int, int, int]) -> bool:
    i, j, k = centre
    return bool((labels[i] == c).any() and (labels[:, j] == c).any() and (labels[:, :, k] == c).any())


def _legend_text(index: int, names: Mapping[int, str], dice: Mapping[int, float]) -> str:
    return (
        f"{label_text(index, names)} · Dice {dice[index]:.2f}" if index in dice else label_text(index, names)
    )


def _heading(title: str, dice: Mapping[int, float], truth: RasVolume | None) -> str:
    if truth is None:
        return title
    score = f"mean Dice {np.mean(list(dice.values())):.3f}" if dice else "mean Dice n/a (nothing segmented)"
    return f"{title} — {score}" if title else score


class _Layout:
    """Pixel positions of every panel: one scale (pixels per mm) for all, so proportions are physical."""

    def __init__(
        self,
        image: RasVolume,
        rows: Sequence[Row],
        columns: Sequence[Column],
        legend: int,
        lines: int,
        dpi: int,
    ):
        self.image, self.rows, self.columns, self.dpi = image, rows, columns, dpi
        shape, spacing = image.data.shape, image.spacing
        extents = {
            v.name: (shape[v.row_axis] * spacing[v.row_axis], shape[v.col_axis] * spacing[v.col_axis])
            for v in VIEWS
        }
        px_per_mm = PANEL_IN * dpi / max(max(e) for e in extents.values())
        self.sizes = {
            v.name: display_shape(
                (shape[v.row_axis], shape[v.col_axis]), (spacing[v.row_axis], spacing[v.col_axis]), px_per_mm
            )
            for v in VIEWS
        }
        self.row_height = max(h for h, _ in self.sizes.values())
        self.lefts = self._lefts()
        width = self.lefts[-1] + self.sizes[columns[-1].view.name][1] + self._px(MARGIN_IN)
        self.top = self._px(MARGIN_IN + lines * TEXT_LINE_IN)
        self.row_step = self._px(HEADER_IN) + self.row_height + self._px(GAP_IN)
        height = self.top + len(rows) * self.row_step + legend_height_px(legend, dpi) + self._px(MARGIN_IN)
        self.canvas = Canvas(width, height, dpi)

    def _px(self, inches: float) -> int:
        return round(inches * self.dpi)

    def _lefts(self) -> list[int]:
        x, lefts = self._px(MARGIN_IN + ROW_LABEL_IN), []
        for index, column in enumerate(self.columns):
            if index:
                same_view = column.view is self.columns[index - 1].view
                x += self.sizes[self.columns[index - 1].view.name][1] + self._px(
                    GAP_IN if same_view else VIEW_GAP_IN
                )
            lefts.append(x)
        return lefts

    def draw(self, window: tuple[float, float], table: np.ndarray) -> Canvas:
        self.window, self.table, self.edge = window, table, max(1, self._px(EDGE_IN))
        for r, row in enumerate(self.rows):
            row_top = self.top + r * self.row_step + self._px(HEADER_IN)
            self.canvas.text(
                self._px(MARGIN_IN + ROW_LABEL_IN / 2),
                row_top + self.row_height / 2,
                row.name,
                rotation=90,
                ha="center",
                va="center",
                fontsize=9,
            )
            grays = {v.name: self._gray(v, row.centre[v.axis]) for v in VIEWS}  # per view, not per column
            for column, left in zip(self.columns, self.lefts, strict=True):
                self._panel(row, column, left, row_top, grays[column.view.name])
        return self.canvas

    def _gray(self, view: View, index: int) -> np.ndarray:
        return resample_linear(reslice(self.image.data, view, index), self.sizes[view.name])

    def _panel(self, row: Row, column: Column, left: int, row_top: int, gray: np.ndarray) -> None:
        view, index = column.view, row.centre[column.view.axis]
        height, width = self.sizes[view.name]
        top = row_top + (self.row_height - height) // 2
        labels = resample_nearest(reslice(column.labels, view, index), (height, width))
        self.canvas.image(compose(gray, labels, self.window, self.table, self.edge), left, top)
        if row is self.rows[0]:  # every row is oriented alike: letters once keep the panels clean
            self.canvas.letters(view.letters, left, top, width, height)
        header = f"{view.name} {index}/{self.image.data.shape[view.axis] - 1}"
        self.canvas.text(
            left + width / 2,
            top - 3,
            f"{header} · {column.kind}" if column.kind else header,
            ha="center",
            va="bottom",
            fontsize=8,
        )
