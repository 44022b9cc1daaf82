"""Reading back what MONAI's MetricsSaver wrote, and telling it which case each row is."""

from __future__ import annotations

import csv
from pathlib import Path


def image_meta(batch: list[dict]) -> list[dict]:
    """MetricsSaver's batch_transform: the image metadata of each decollated item, for its file name."""
    return [item["image"].meta for item in batch]


def read_metric_means(output_dir: str | Path) -> dict[str, float]:
    """The mean of each metric over all cases, from MetricsSaver's ``metrics.csv``."""
    path = Path(output_dir) / "metrics.csv"
    means = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("\t") if "\t" in line else line.partition(",")
        if name:
            means[name] = float(value)
    return means


def read_per_case(output_dir: str | Path, metric: str) -> list[dict[str, str]]:
    """Rows of ``<metric>_raw.csv``: the file name and the value per class and their mean."""
    path = Path(output_dir) / f"{metric}_raw.csv"
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if "\t" in handle.readline() else ","))
