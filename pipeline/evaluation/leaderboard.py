"""The leaderboard of ``medseg compare``: one row per bundle (and variant), ranked by mean Dice.

With k folds each figure is the mean over folds of the per-fold mean over held-out cases, with its
standard deviation; a row whose mean Dice is within the spread of the leader's (the difference is
no larger than either standard deviation) says so, because ranking two models inside their own
fold-to-fold noise would claim more than the data shows.
"""

from __future__ import annotations

import csv
import html
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.evaluation.report import CASE_TABLE
from pipeline.io.atomic import atomic_write

RANK_BY = "dice_mean"
SHOWN_METRICS = ("dice", "iou", "hd95")  # per-class columns `<metric>_<class>` of per_case.csv


@dataclass
class Entry:
    """One leaderboard row, accumulated fold by fold."""

    name: str
    tta: bool = False
    per_fold: list[dict[str, float]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    infer_seconds_per_case: list[float] = field(default_factory=list)
    peak_gib: list[float] = field(default_factory=list)
    parameters: int | None = None
    failure: str | None = None

    def add_fold(
        self, means: Mapping[str, float], trained: Mapping[str, float] | None, inferred: Mapping[str, float]
    ) -> None:
        self.per_fold.append(dict(means))
        if trained:
            self.train_seconds.append(trained["seconds"])
        self.infer_seconds_per_case.append(inferred["seconds"] / max(1, int(means.get("cases", 1))))
        self.peak_gib.append(inferred["peak_gib"])

    def mean(self, column: str) -> float:
        values = [fold[column] for fold in self.per_fold if column in fold]
        return statistics.fmean(values) if values else float("nan")

    def std(self, column: str) -> float:
        values = [fold[column] for fold in self.per_fold if column in fold]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def case_means(evaluation_dir: str | Path) -> dict[str, float]:
    """Mean over the cases of every numeric column of an evaluation's per-case table, and ``cases``."""
    with (Path(evaluation_dir) / CASE_TABLE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    means: dict[str, float] = {"cases": float(len(rows))}
    for column in rows[0] if rows else []:
        try:
            means[column] = statistics.fmean(float(row[column]) for row in rows)
        except ValueError:
            continue  # the case name, or any other text column
    return means


def ranked(entries: Iterable[Entry]) -> list[Entry]:
    """Best mean Dice first; failed rows last."""
    return sorted(entries, key=lambda e: (e.failure is not None, -_or_minus_inf(e.mean(RANK_BY))))


def _or_minus_inf(value: float) -> float:
    return value if value == value else float("-inf")


def spread_note(entry: Entry, leader: Entry) -> str:
    if entry is leader or len(entry.per_fold) < 2:
        return ""
    gap = leader.mean(RANK_BY) - entry.mean(RANK_BY)
    if gap <= max(leader.std(RANK_BY), entry.std(RANK_BY)):
        return f"within the fold spread of {leader.name} (gap {gap:.3f})"
    return ""


def class_columns(entries: Sequence[Entry]) -> list[str]:
    """``<metric>_<class>`` columns present in any row, metric by metric, mean columns excluded."""
    present = {column for entry in entries for fold in entry.per_fold for column in fold}
    return [
        column
        for metric in SHOWN_METRICS
        for column in sorted(present)
        if column.startswith(f"{metric}_") and column != f"{metric}_mean"
    ]


def table(entries: Sequence[Entry]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard, as text."""
    order = ranked(entries)
    columns = class_columns(order)
    header = ["rank", "model", "mean Dice", *columns, "parameters", "epochs", "training min"]
    header += ["inference s/case", "peak memory GiB", "note"]
    rows = []
    for rank, entry in enumerate(order, start=1):
        if entry.failure:
            rows.append([str(rank), entry.name, *["-"] * (len(header) - 3), entry.failure])
            continue
        rows.append(
            [
                str(rank),
                entry.name,
                _with_spread(entry, RANK_BY),
                *[_with_spread(entry, column) for column in columns],
                f"{entry.parameters:,}" if entry.parameters else "-",
                "/".join(str(e) for e in entry.epochs) or "-",
                f"{sum(entry.train_seconds) / 60 / len(entry.train_seconds):.1f}"
                if entry.train_seconds
                else "-",
                f"{statistics.fmean(entry.infer_seconds_per_case):.2f}",
                f"{max(entry.peak_gib):.2f}",
                spread_note(entry, order[0]),
            ]
        )
    return header, rows


def _with_spread(entry: Entry, column: str) -> str:
    digits = 2 if column.startswith("hd95") else 3
    text = f"{entry.mean(column):.{digits}f}"
    return f"{text} ± {entry.std(column):.{digits}f}" if len(entry.per_fold) > 1 else text


def write_leaderboard(entries: Sequence[Entry], output_dir: Path, subtitle: str) -> tuple[Path, Path]:
    """``leaderboard.md`` and a self-contained ``leaderboard.html`` with the same table."""
    header, rows = table(entries)
    lines = ["# Leaderboard", "", subtitle, "", "| " + " | ".join(header) + " |"]
    lines += ["|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    markdown = output_dir / "leaderboard.md"
    with atomic_write(markdown) as handle:
        handle.write(("\n".join(lines) + "\n").encode())
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Leaderboard</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}</style></head><body><h1>Leaderboard</h1>"
        f"<p>{html.escape(subtitle)}</p><table><tr>{cells}</tr>{body}</table></body></html>\n"
    )
    target = output_dir / "leaderboard.html"
    with atomic_write(target) as handle:
        handle.write(page.encode())
    return markdown, target
