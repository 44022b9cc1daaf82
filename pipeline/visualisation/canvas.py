"""A figure laid out in pixels, as the PNG will be: panels pasted 1:1, text and legend drawn over them.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so rendering from data-loader workers,
MLflow callbacks or threads never touches global backend or figure state. The panels are composed
in numpy and pasted into one pixel buffer that the renderer draws as is: matplotlib's image
pipeline (``imshow``, ``figimage``) would resample every panel again, which was most of the time of
a picture. That is also why the layout is computed here in pixels and not left to a layout engine:
a panel's pixel box is known exactly, and its size is its physical size times the DPI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from pipeline.io.atomic import atomic_write
from pipeline.visualisation.panels import class_colour

DPI = 100
MIN_DPI = 20  # below it the text no longer fits its bands
LEGEND_COLUMNS = 6
LEGEND_ROW_IN = 0.28
TEXT_LINE_IN = 0.22  # one line of a heading or note
PNG_COMPRESSION = 3  # zlib level: PIL's default (6) takes 2-3 times as long for files 1-10 % smaller
LETTER_COLOUR = "yellow"  # the anatomical direction letters on the panels
MIN_LETTER_ROOM_IN = 0.45  # panel side below which its two letters would collide


class _Pixels(Artist):
    """An RGBA buffer of the figure's own size, drawn at the origin without resampling.

    Only correct when the figure is saved at its own DPI, which ``write_png`` does.
    """

    zorder = -1  # under every text

    def __init__(self, rgba: np.ndarray) -> None:
        super().__init__()
        self.rgba = rgba

    def draw(self, renderer: RendererBase) -> None:
        gc = renderer.new_gc()
        renderer.draw_image(gc, 0, 0, self.rgba[::-1])  # the renderer's rows run bottom-up
        gc.restore()


class Canvas:
    """Coordinates are pixels from the top-left corner of the PNG.

    ``panels`` records each pasted panel's box (left, top, width, height), for callers that map
    pixels back to the volume.
    """

    def __init__(self, width_px: int, height_px: int, dpi: int = DPI) -> None:
        if dpi < MIN_DPI:
            raise ValueError(f"dpi must be at least {MIN_DPI}, not {dpi}")
        self.width, self.height, self.dpi = width_px, height_px, dpi
        self.figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
        self.pixels = np.full((height_px, width_px, 4), 255, dtype=np.uint8)
        self.figure.add_artist(_Pixels(self.pixels))
        self.panels: list[tuple[int, int, int, int]] = []

    def px(self, inches: float) -> int:
        return round(inches * self.dpi)

    def image(self, rgb: np.ndarray, left: int, top: int) -> None:
        """Paste an RGB panel (floats in 0..1) pixel for pixel with its top-left corner at (left, top)."""
        height, width = rgb.shape[:2]
        pixels = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
        self.pixels[top : top + height, left : left + width, :3] = pixels
        self.panels.append((left, top, width, height))

    def text(self, x: float, y: float, text: str, **style: object) -> None:
        self.figure.text(x / self.width, 1.0 - y / self.height, text, **style)

    def letters(self, letters: str, left: int, top: int, width: int, height: int) -> None:
        """Direction letters (top, bottom, left, right) just inside the edges of a panel."""
        inset = max(2, self.px(0.03))
        places = (
            (left + width / 2, top + inset, "center", "top"),
            (left + width / 2, top + height - inset, "center", "bottom"),
            (left + inset, top + height / 2, "left", "center"),
            (left + width - inset, top + height / 2, "right", "center"),
        )
        room = (
            height,
            height,
            width,
            width,
        )  # a thin slab's panel has no room for its top and bottom letters
        for (x, y, ha, va), letter, size in zip(places, letters, room, strict=True):
            if size >= self.px(MIN_LETTER_ROOM_IN):
                self.text(x, y, letter, ha=ha, va=va, color=LETTER_COLOUR, fontsize=7, fontweight="bold")

    def legend(self, entries: Mapping[int, str], extra: Sequence[Artist] = ()) -> None:
        """A patch per class (index -> text), in the class's palette colour, plus any ``extra`` handles."""
        handles: list[Artist] = [
            Patch(facecolor=class_colour(c), edgecolor=class_colour(c), label=text)
            for c, text in entries.items()
        ]
        handles += list(extra)
        if handles:
            self.figure.legend(
                handles=handles,
                loc="lower center",
                bbox_to_anchor=(0.5, 0.0),
                ncols=min(len(handles), LEGEND_COLUMNS),
                frameon=False,
                fontsize=9,
            )


def legend_height_px(entries: int, dpi: int) -> int:
    rows = -(-entries // LEGEND_COLUMNS) if entries else 0
    return round((rows * LEGEND_ROW_IN + (0.1 if rows else 0.0)) * dpi)


def write_png(figure: Figure, out_png: str | Path) -> Path:
    """At the figure's own DPI (its panels are in its pixels), as RGB (no alpha: a quarter less to
    compress), atomically, so that a watcher (a browser on the report, MLflow) never reads half a file."""
    agg = FigureCanvasAgg(figure)
    agg.draw()
    rgb = np.ascontiguousarray(np.asarray(agg.buffer_rgba())[..., :3])
    with atomic_write(out_png) as handle:
        Image.fromarray(rgb).save(handle, format="png", compress_level=PNG_COMPRESSION)
    return Path(out_png)
