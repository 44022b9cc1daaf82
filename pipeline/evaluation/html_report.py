"""``report.html``: one self-contained page a reader can open anywhere or download from MLflow.

Every picture is a PNG embedded as a ``data:`` URI and the style is inline: no script, no stylesheet,
no file beside it. The page holds the summary (mean, median, standard deviation per class and
metric, for each variant side by side), the per-case tables, a box plot per metric (pixel and Rand
error too in a 2D evaluation: ``metrics.PLANAR_METRICS``), and overlays of the best, median and worst
cases by mean Dice (ground truth above prediction, drawn by ``pipeline.visualisation.save_overlay``).
Figures use a bare matplotlib ``Figure`` (no pyplot), so drawing from an engine handler touches no
global state.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.evaluation.report import (
    CaseResult,
    case_columns,
    case_row,
    document_metrics,
    variant_metrics,
    variant_title,
)
from pipeline.io.atomic import atomic_write
from pipeline.visualisation import save_overlay

logger = logging.getLogger(__name__)

METRIC_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "hd95": "HD95 (mm)",
    "asd": "ASD (mm)",
    "pixel_error": "pixel error",
    "rand_error": "Rand error",
}
VARIANT_COLOURS = ("#4363d8", "#f58231", "#3cb44b", "#911eb4")
UNAVAILABLE = '<p class="note">overlay unavailable (image not a NIfTI file, or prediction not saved)</p>'
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
    "figure{margin:1em 0}figcaption{font-weight:bold}.note{color:#555}"
)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def box_plot_png(document: Mapping, label_names: Mapping[int, str]) -> bytes:
    """One panel per metric, one box per class and variant (the variants side by side in colour), with
    every case drawn as a dot: a box of three cases hides more than it shows."""
    variants = list(document["variants"])
    names = [n for i, n in sorted(label_names.items()) if int(i) > 0]
    metrics = document_metrics(document)
    fig = Figure(figsize=(4.2 * len(metrics), 3.8), layout="constrained")
    width = 0.8 / len(variants)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        for v, variant in enumerate(variants):
            cases = document["variants"][variant]["cases"]
            data = [[case[name][metric] for case in cases if name in case] for name in names]
            positions = [i + (v - (len(variants) - 1) / 2) * width for i in range(len(names))]
            colour = VARIANT_COLOURS[v % len(VARIANT_COLOURS)]
            ax.boxplot(
                data, positions=positions, widths=width * 0.9, patch_artist=True,
                boxprops={"facecolor": colour, "alpha": 0.6}, medianprops={"color": "black"},
                showfliers=False,
            )  # fmt: skip
            for position, values in zip(positions, data, strict=True):  # every case, as few may be
                ax.scatter([position] * len(values), values, s=10, color="black", alpha=0.6, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(METRIC_TITLES[metric])
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=VARIANT_COLOURS[v % len(VARIANT_COLOURS)], alpha=0.6, label=variant_title(n))
               for v, n in enumerate(variants)]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return figure_png(fig)


def ranked_cases(results: Sequence[CaseResult], variant: str) -> list[tuple[str, CaseResult]]:
    """Best, median and worst case by mean Dice; with fewer than three cases, best and worst."""
    order = sorted(results, key=lambda r: (-r.mean_dice(variant), r.case))
    if len(order) < 3:
        return [("best", order[0]), ("worst", order[-1])][: len(order)]
    return [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]


def overlay_png(
    result: CaseResult, label_names: Mapping[int, str], modality: str, title: str
) -> bytes | None:
    """The case's ground truth above its prediction; None (and a warning) when it cannot be drawn."""
    if not (result.image and result.label and result.prediction):
        return None
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "overlay.png"
        try:
            save_overlay(
                result.image, result.prediction, png,
                label=result.label, label_names=label_names, modality=modality, title=title,
            )  # fmt: skip
        except Exception as error:  # a picture must not cost the evaluation its numbers
            logger.warning("no overlay for case %s: %s: %s", result.case, type(error).__name__, error)
            return None
        return png.read_bytes()


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return html.escape(str(value))


def summary_html(document: Mapping) -> str:
    variants = list(document["variants"])
    header = ["class", "metric"] + [
        f"{stat} ({variant_title(v)})" for v in variants for stat in ("mean", "median", "std")
    ]
    first = document["variants"][variants[0]]["summary"]
    rows = [
        [name, METRIC_TITLES[metric]]
        + [
            document["variants"][v]["summary"][name][metric][s]
            for v in variants
            for s in ("mean", "median", "std")
        ]
        for name in first
        for metric in document_metrics(document)
    ]
    return table_html(header, rows)


def cases_html(results: Sequence[CaseResult], variant: str, label_names: Mapping[int, str]) -> str:
    metrics = variant_metrics(results, variant)
    columns = case_columns(label_names, sorted(results[0].scores[variant]), metrics)
    rows = [case_row(r.case, r.scores[variant], label_names, metrics) for r in results]
    return table_html(columns, [[row[c] for c in columns] for row in rows])


def overlays_html(
    results: Sequence[CaseResult], variant: str, label_names: Mapping[int, str], modality: str
) -> str:
    parts = []
    for rank, result in ranked_cases(results, variant):
        caption = f"{rank}: {result.case} (mean Dice {result.mean_dice(variant):.3f})"
        png = overlay_png(result, label_names, modality, f"{rank}: {result.case}")
        body = f'<img alt="{html.escape(caption)}" src="{data_uri(png)}">' if png else UNAVAILABLE
        parts.append(f"<figure><figcaption>{html.escape(caption)}</figcaption>{body}</figure>")
    return "".join(parts)


def settings_html(postprocessing: Mapping | None) -> str:
    if postprocessing is None:
        return "<p>Predictions scored as given (no post-processing applied here).</p>"
    items = "".join(
        f"<li><code>{html.escape(k)}</code>: {html.escape(str(v))}</li>" for k, v in postprocessing.items()
    )
    return f"<p>Post-processing settings of this run:</p><ul>{items}</ul>"


def write_report(
    path: Path,
    results: Sequence[CaseResult],
    document: Mapping,
    label_names: Mapping[int, str],
    *,
    modality: str = "MRI",
    title: str = "Evaluation",
) -> Path:
    """Assemble the page and write it atomically."""
    variants = list(document["variants"])
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(results)} cases. Distances in mm, volumes in ml. {html.escape(document['empty_rule'])}</p>",
        *([f"<p>{html.escape(document['planar_rule'])}</p>"] if "planar_rule" in document else []),
        settings_html(document["postprocessing"]),
        "<h2>Summary</h2>",
        summary_html(document),
        "<h2>Distribution per metric</h2>",
        f'<img alt="box plots" src="{data_uri(box_plot_png(document, label_names))}">',
        f"<h2>Best, median and worst cases ({html.escape(variant_title(variants[0]))})</h2>",
        overlays_html(results, variants[0], label_names, modality),
    ]
    for variant in variants:
        sections += [
            f"<h2>Per case, {html.escape(variant_title(variant))}</h2>",
            cases_html(results, variant, label_names),
        ]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    with atomic_write(path) as handle:
        handle.write(page.encode("utf-8"))
    return path
