"""Many cases in one PNG: the axial slice through each case's largest structure, titled with name and Dice.

One panel per case, so truth and prediction share it: the prediction as fill and outline in the class
colours (as in the overlays), the truth as a white outline on top. Where they agree the white line
runs along the coloured edge; where they disagree the two part, which is what a reader scans for.
Cases are read one at a time and only their slice is kept, so a montage of a whole test set stays
within the memory of one case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke

from pipeline.data.datalist import cases as datalist_cases
from pipeline.data.layouts import listing
from pipeline.io.dicom import is_series_path
from pipeline.io.names import case_name
from pipeline.io.readers import series_name_formatter
from pipeline.visualisation.canvas import DPI, TEXT_LINE_IN, Canvas, legend_height_px, write_png
from pipeline.visualisation.panels import (
    AXIAL,
    class_dice,
    colour_table,
    compose,
    display_shape,
    intensity_window,
    label_text,
    outline,
    resample_linear,
    resample_nearest,
    reslice,
    structures,
)
from pipeline.visualisation.volumes import RasVolume, check_same_grid, load_image, load_labels

TILE_IN = 2.4  # the longer side of each case's panel
TILE_TITLE_IN, GAP_IN, MARGIN_IN = 0.26, 0.1, 0.1
EDGE_IN = 0.02
TRUTH_COLOUR = (1.0, 1.0, 1.0)
PREDICTION_SUFFIX = "_seg.nii.gz"  # what `medseg infer` writes: <output_dir>/<case>_seg.nii.gz


@dataclass(frozen=True)
class MontageCase:
    name: str
    image: str | Path
    seg: str | Path
    label: str | Path | None = None


@dataclass(frozen=True)
class Tile:
    title: str
    rgb: np.ndarray
    classes: frozenset[int]
    dice: float | None


def save_montage(
    cases: Sequence[MontageCase],
    out_png: str | Path,
    *,
    label_names: Mapping[int, str] | None = None,
    modality: str = "MRI",
    columns: int | None = None,
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """One tile per case in a grid (``columns`` wide, or about square); returns the PNG's path."""
    options = {"label_names": label_names, "modality": modality, "columns": columns, "title": title}
    return write_png(montage_canvas(cases, dpi=dpi, **options).figure, out_png)


def montage_canvas(
    cases: Sequence[MontageCase],
    *,
    label_names: Mapping[int, str] | None = None,
    modality: str = "MRI",
    columns: int | None = None,
    title: str = "",
    dpi: int = DPI,
) -> Canvas:
    """The montage with its tiles' pixel boxes (``canvas.panels``, in case order)."""
    if not cases:
        raise ValueError("a montage needs at least one case")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")
    tiles = [case_tile(case, modality, dpi) for case in cases]
    classes = sorted(set().union(*(tile.classes for tile in tiles)))
    has_truth = any(case.label is not None for case in cases)
    canvas = _grid(tiles, columns or math.ceil(math.sqrt(len(tiles))), len(classes) + has_truth, dpi)
    scores = [tile.dice for tile in tiles if tile.dice is not None]
    if scores:
        title = f"{title} — " if title else ""
        title += f"mean Dice {np.mean(scores):.3f} over {len(scores)} case{'s' * (len(scores) > 1)}"
    canvas.text(
        canvas.width / 2, canvas.px(MARGIN_IN + TEXT_LINE_IN), title, ha="center", va="center", fontsize=11
    )
    truth_entry = Line2D(
        [],
        [],
        color=TRUTH_COLOUR,
        linewidth=2,
        label="ground truth (outline)",
        path_effects=[withStroke(linewidth=4, foreground="black")],
    )
    names = dict(label_names or {})
    canvas.legend({c: label_text(c, names) for c in classes}, [truth_entry] if has_truth else [])
    return canvas


def case_tile(case: MontageCase, modality: str, dpi: int) -> Tile:
    """The case's panel; the volumes are dropped on return, only the slice's pixels are kept."""
    image, pred = load_image(case.image), load_labels(case.seg)
    check_same_grid(image, pred)
    truth = load_labels(case.label) if case.label is not None else None
    if truth is not None:
        check_same_grid(image, truth)
    in_pred = structures(pred.data)
    in_truth = structures(truth.data) if truth is not None else {}
    classes = sorted(set(in_pred) | set(in_truth))
    reference = in_truth or in_pred  # the truth's largest structure, unless the truth is empty
    k = max(reference.values(), key=lambda s: s.voxels).centre[2] if reference else image.data.shape[2] // 2
    rgb = _axial_pixels(image, pred, truth, k, modality, dpi, max(classes, default=0))
    dice = None
    if truth is not None and classes:
        dice = float(np.mean(list(class_dice(pred.data, truth.data, in_pred, in_truth).values())))
    return Tile(_tile_title(case, truth is not None, dice), rgb, frozenset(classes), dice)


def _axial_pixels(
    image: RasVolume,
    pred: RasVolume,
    truth: RasVolume | None,
    k: int,
    modality: str,
    dpi: int,
    top_class: int,
) -> np.ndarray:
    """Axial slice ``k`` fitted into a ``TILE_IN`` square at its physical proportions, truth outlined."""
    (nx, ny, _), (sx, sy, _) = image.data.shape, image.spacing
    shape = display_shape((ny, nx), (sy, sx), TILE_IN * dpi / max(nx * sx, ny * sy))
    gray = resample_linear(reslice(image.data, AXIAL, k), shape)
    labels = resample_nearest(reslice(pred.data, AXIAL, k), shape)
    edge = max(1, round(EDGE_IN * dpi))
    rgb = compose(gray, labels, intensity_window(image.data, modality), colour_table(top_class), edge)
    if truth is not None:
        rgb[outline(resample_nearest(reslice(truth.data, AXIAL, k), shape), max(1, edge // 2))] = TRUTH_COLOUR
    return rgb


def _tile_title(case: MontageCase, has_truth: bool, dice: float | None) -> str:
    if not has_truth:
        return case.name
    return f"{case.name} · Dice {dice:.3f}" if dice is not None else f"{case.name} · Dice n/a"


def _grid(tiles: Sequence[Tile], columns: int, legend_entries: int, dpi: int) -> Canvas:
    """Equal cells of one tile's size; each tile centred in its cell under its title."""
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    px = lambda inches: round(inches * dpi)  # noqa: E731
    cell_w = max(tile.rgb.shape[1] for tile in tiles)
    cell_h = max(tile.rgb.shape[0] for tile in tiles) + px(TILE_TITLE_IN)
    width = 2 * px(MARGIN_IN) + columns * cell_w + (columns - 1) * px(GAP_IN)
    top = px(MARGIN_IN + 2 * TEXT_LINE_IN)
    height = top + rows * (cell_h + px(GAP_IN)) + legend_height_px(legend_entries, dpi) + px(MARGIN_IN)
    canvas = Canvas(width, height, dpi)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        left = px(MARGIN_IN) + column * (cell_w + px(GAP_IN))
        cell_top = top + row * (cell_h + px(GAP_IN))
        tile_h, tile_w = tile.rgb.shape[:2]
        panel_top = cell_top + px(TILE_TITLE_IN) + (cell_h - px(TILE_TITLE_IN) - tile_h) // 2
        canvas.image(tile.rgb, left + (cell_w - tile_w) // 2, panel_top)
        canvas.letters(AXIAL.letters, left + (cell_w - tile_w) // 2, panel_top, tile_w, tile_h)
        canvas.text(
            left + cell_w / 2,
            cell_top + px(TILE_TITLE_IN) / 2,
            tile.title,
            ha="center",
            va="center",
            fontsize=8,
        )
    return canvas


def prediction_name(image: str | Path) -> str:
    """The case name `medseg infer` gives an input's prediction (a DICOM series is named by its folder)."""
    if is_series_path(image):
        subject = series_name_formatter({"filename_or_obj": str(image)}, None)["subject"]
        return Path(subject).stem
    return case_name(Path(image))


def datalist_montage_cases(
    datalist: str | Path, predictions: str | Path, split: str = "test"
) -> list[MontageCase]:
    """The cases of a datalist split with their predictions in ``predictions``; every missing one is named."""
    entries = datalist_cases(datalist, role=split)
    if not entries:
        raise ValueError(f"datalist {datalist} has no {split} cases")
    found, missing = [], []
    for entry in entries:
        image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
        name = prediction_name(image)
        seg = Path(predictions) / f"{name}{PREDICTION_SUFFIX}"
        if not seg.is_file():
            missing.append(seg.name)
        found.append(MontageCase(name, image, seg, entry.get("label")))
    if missing:
        raise FileNotFoundError(
            f"{predictions} has no prediction {listing(missing)} for the {split} cases of {datalist}"
        )
    return found


def parse_case(text: str) -> MontageCase:
    """``IMAGE:SEG[:LABEL]`` from the command line."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"case {text!r} is not IMAGE:SEG or IMAGE:SEG:LABEL")
    return MontageCase(prediction_name(parts[0]), parts[0], parts[1], parts[2] if len(parts) == 3 else None)
