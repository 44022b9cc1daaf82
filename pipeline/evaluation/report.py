"""The tables of an evaluation: ``per_case.csv`` and ``metrics.json`` (``outputs`` adds ``report.html``).

One result per case holds the scores of one or more *variants* of its prediction: the evaluate
workflow scores the saved segmentation (``postprocessed``) and the network's argmax before
post-processing (``argmax``), so the effect of post-processing is visible; scoring files already on
disk gives one variant (``predictions``). ``per_case.csv`` is the first variant, one row per case and
columns ``<metric>_<class name>`` and ``<metric>_mean`` (other code reads it: keep those names);
each further variant gets ``per_case_<variant>.csv``. No file path is written: these files go to
MLflow, and paths to patient data must not.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.evaluation.metrics import (
    EMPTY_RULE,
    METRICS,
    PLANAR_METRICS,
    PLANAR_RULE,
    VOLUMES,
    ClassScores,
    class_means,
    scored_metrics,
    summarise,
)
from pipeline.io.atomic import atomic_write
from pipeline.tracking.safe import case_label, metric_name

CASE_TABLE = "per_case.csv"
SUMMARY_FILE = "metrics.json"
REPORT_FILE = "report.html"
VARIANT_TITLES = {
    "postprocessed": "with post-processing",
    "argmax": "without post-processing",
    "predictions": "as given",
}


@dataclass
class CaseResult:
    """The scores of one case per variant; the file paths are kept only to draw its overlay."""

    case: str
    scores: dict[str, dict[int, ClassScores]]
    image: str | None = None
    label: str | None = None
    prediction: str | None = None

    def mean_dice(self, variant: str) -> float:
        return class_means(self.scores[variant]).get("dice", 0.0)


def image_meta(batch: list[dict]) -> list[dict]:
    """MetricsSaver's batch_transform: each decollated item's case name as its file name, so that its
    tables (``mean_dice_raw.csv``...), which go to MLflow, hold no path and no DICOM UID."""
    return [
        {"filename_or_obj": case_label(str(item["image"].meta.get("filename_or_obj", "?")))} for item in batch
    ]


def variant_title(variant: str) -> str:
    return VARIANT_TITLES.get(variant, variant)


def case_table_name(variant: str, variants: Sequence[str]) -> str:
    return CASE_TABLE if variant == variants[0] else f"per_case_{variant}.csv"


def case_columns(
    label_names: Mapping[int, str], classes: Sequence[int], metrics: Sequence[str] = METRICS
) -> list[str]:
    """``metrics``: those of every case of the table (``variant_metrics``), so all rows fit it."""
    names = [label_names[c] for c in classes]
    columns = ["case"]
    for metric in metrics:
        columns += [f"{metric}_{name}" for name in names] + [f"{metric}_mean"]
    for volume in VOLUMES:
        columns += [f"{volume}_{name}" for name in names]
    return columns


def case_row(
    case: str,
    scores: Mapping[int, ClassScores],
    label_names: Mapping[int, str],
    metrics: Sequence[str] = METRICS,
) -> dict:
    row: dict[str, str | float] = {"case": case}
    means = class_means(scores, metrics)
    for metric in metrics:
        row |= {f"{metric}_{label_names[c]}": significant(getattr(s, metric)) for c, s in scores.items()}
        row[f"{metric}_mean"] = significant(means[metric])
    for volume in VOLUMES:
        row |= {f"{volume}_{label_names[c]}": significant(getattr(s, volume)) for c, s in scores.items()}
    return row


def variant_metrics(results: Sequence[CaseResult], variant: str) -> tuple[str, ...]:
    """The metrics of a variant's table: the planar ones only when every case is 2D."""
    return scored_metrics(r.scores[variant] for r in results)


def significant(value: float) -> float:
    """Six significant digits: a table to read, exact enough for any mean taken from it."""
    return float(f"{value:.6g}")


def write_case_table(
    path: Path, results: Sequence[CaseResult], variant: str, label_names: Mapping[int, str]
) -> Path:
    classes = sorted(results[0].scores[variant]) if results else []
    text = io.StringIO()
    metrics = variant_metrics(results, variant)
    writer = csv.DictWriter(text, case_columns(label_names, classes, metrics), lineterminator="\n")
    writer.writeheader()
    writer.writerows(case_row(r.case, r.scores[variant], label_names, metrics) for r in results)
    with atomic_write(path) as handle:
        handle.write(text.getvalue().encode())
    return path


def summary_document(
    results: Sequence[CaseResult],
    variants: Sequence[str],
    label_names: Mapping[int, str],
    postprocessing: Mapping | None,
) -> dict:
    """``metrics.json``: the rules, the settings, and per variant the summary and every case."""
    planar = bool(variants) and bool(set(PLANAR_METRICS) & set(variant_metrics(results, variants[0])))
    document: dict = {
        "labels": {str(i): n for i, n in sorted(label_names.items()) if int(i) > 0},
        "units": {"hd95": "mm", "asd": "mm", "pred_ml": "ml", "gt_ml": "ml"},
        "empty_rule": EMPTY_RULE,
        **({"planar_rule": PLANAR_RULE} if planar else {}),
        "std": "sample standard deviation over the cases (0 for one case)",
        "postprocessing": dict(postprocessing) if postprocessing is not None else None,
        "primary": variants[0] if variants else None,
        "variants": {},
    }
    for variant in variants:
        per_case = [r.scores[variant] for r in results]
        document["variants"][variant] = {
            "title": variant_title(variant),
            "summary": summarise(per_case, label_names),
            "cases": [
                {"case": r.case, **{label_names[c]: s.as_dict() for c, s in r.scores[variant].items()}}
                for r in results
            ],
        }
    return document


def write_summary(path: Path, document: Mapping) -> Path:
    with atomic_write(path) as handle:
        handle.write((json.dumps(document, indent=2) + "\n").encode())
    return path


def read_summary(output_dir: str | Path) -> dict:
    """The ``metrics.json`` of an evaluation, naming the file when it is absent."""
    path = Path(output_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run medseg evaluate first")
    return json.loads(path.read_text())


def document_metrics(document: Mapping) -> list[str]:
    """The metrics ``metrics.json`` summarises (the planar ones for a 2D evaluation)."""
    first = next(iter(document["variants"].values()))["summary"]
    return list(first["mean"]) if first else list(METRICS)


TERMINAL_COLUMNS = {  # metric: heading, width, format
    "dice": ("Dice", 7, ".4f"),
    "iou": ("IoU", 7, ".4f"),
    "hd95": ("HD95 mm", 9, ".2f"),
    "asd": ("ASD mm", 8, ".2f"),
    "pixel_error": ("Pixel err", 9, ".4f"),
    "rand_error": ("Rand err", 8, ".4f"),
}


def summary_lines(document: Mapping) -> list[str]:
    """The means per class and metric of every variant, as lines for a terminal."""
    columns = {m: TERMINAL_COLUMNS[m] for m in document_metrics(document)}
    heading = "".join(f" {title:>{width}}" for title, width, _ in columns.values())
    lines = []
    for variant, content in document["variants"].items():
        lines.append(f"{variant_title(variant)}: mean over {len(content['cases'])} cases")
        lines.append(f"  {'class':<20}{heading}")
        for name, stats in content["summary"].items():
            cells = (f" {stats[m]['mean']:>{width}{form}}" for m, (_, width, form) in columns.items())
            lines.append(f"  {name:<20}" + "".join(cells))
    return lines


def flat_means(document: Mapping) -> dict[str, float]:
    """Summary means as flat metric names: ``dice_<class>``, ``hd95_mean``...; other variants prefixed."""
    metrics = {}
    for position, (variant, content) in enumerate(document["variants"].items()):
        prefix = "" if position == 0 else f"{variant}_"
        for name, per_metric in content["summary"].items():
            for metric, stats in per_metric.items():
                metrics[metric_name(f"{prefix}{metric}_{name}")] = float(stats["mean"])
    return metrics
