"""Reading back what MONAI's MetricsSaver wrote, and naming its columns after the labels."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.data.layouts import case_name

CASE_TABLE = "per_case.csv"


def image_meta(batch: list[dict]) -> list[dict]:
    """MetricsSaver's batch_transform: the image metadata of each decollated item, for its file name."""
    return [item["image"].meta for item in batch]


def read_metric_means(output_dir: str | Path) -> dict[str, float]:
    """The mean of each metric over all cases, from MetricsSaver's ``metrics.csv``."""
    rows = (Path(output_dir) / "metrics.csv").read_text().splitlines()
    return {name: float(value) for name, value in (row.split(",", 1) for row in rows if row)}


def read_per_case(output_dir: str | Path, metric: str) -> list[dict[str, str]]:
    """Rows of ``<metric>_raw.csv``: the file name, the value per foreground class, and their mean."""
    with (Path(output_dir) / f"{metric}_raw.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_case_table(output_dir: str | Path, labels: Mapping[int, str], metrics: Sequence[str]) -> Path:
    """One row per case, one column per metric and class *name* (MetricsSaver numbers them from 0
    without the background, so ``class0`` is label 1)."""
    output_dir = Path(output_dir)
    foreground = [name for index, name in sorted(labels.items()) if index > 0]
    table: dict[str, dict[str, str]] = {}
    for metric in metrics:
        short = metric.removeprefix("mean_")
        for row in read_per_case(output_dir, metric):
            named = table.setdefault(case_name(Path(row["filename"])), {})
            for position, name in enumerate(foreground):
                named[f"{short}_{name}"] = row[f"class{position}"]
            named[f"{short}_mean"] = row["mean"]
    columns = ["case", *next(iter(table.values()), {})]
    target = output_dir / CASE_TABLE
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({"case": case, **values} for case, values in sorted(table.items()))
    return target
