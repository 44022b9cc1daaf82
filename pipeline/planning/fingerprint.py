"""The dataset fingerprint the plan is made from: one pass of MONAI's ``DataAnalyzer`` over the
labelled cases, cached beside the datalist.

Why MONAI's analyser: it is Auto3DSeg's own statistics pass (spacing, shape, shape cropped to the
non-zero box, intensity inside the labels, class fractions), so there is no second one to keep right.
Why a cache keyed per case by file size and mtime: a second plan is instant, and a changed or added
case is the only one read again (DataAnalyzer runs on that subset and the result is merged).
Why every labelled case and sorted: the plan must not depend on the validation fold or on the order
the datalist lists its cases in (the folds follow that order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.auto3dseg import DataAnalyzer
from monai.apps.auto3dseg.transforms import EnsureSameShaped
from monai.transforms import EnsureTyped, LoadImaged, Orientationd

from pipeline.data.datalist import cases as datalist_cases
from pipeline.data.datalist import label_names, label_values, read_json
from pipeline.io.atomic import atomic_write
from pipeline.io.dicom import split_series_path
from pipeline.io.readers import InputReader
from pipeline.transforms import LabelValuesd

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1  # bump when CaseStats changes: every cached case is then read again
CACHE_SUFFIX = ".fingerprint.json"


@dataclass(frozen=True)
class ChannelStats:
    """One channel's intensities inside the labelled foreground (label > 0) of one case."""

    mean: float
    std: float
    p00_5: float
    p99_5: float
    voxels: int


@dataclass(frozen=True)
class CaseStats:
    """What the planner needs of one case; ``name`` is its image path relative to the datalist."""

    name: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    cropped_shape: tuple[int, ...]  # the box of non-zero voxels (DataAnalyzer's crop)
    foreground: tuple[ChannelStats, ...]  # per channel
    class_fractions: dict[int, float]  # label -> fraction of the case's voxels

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    def class_voxels(self, label: int) -> int:
        return round(self.class_fractions.get(label, 0.0) * self.voxels)

    @staticmethod
    def from_dict(data: dict) -> CaseStats:
        return CaseStats(
            name=data["name"],
            spacing=tuple(float(s) for s in data["spacing"]),
            shape=tuple(int(s) for s in data["shape"]),
            cropped_shape=tuple(int(s) for s in data["cropped_shape"]),
            foreground=tuple(ChannelStats(**c) for c in data["foreground"]),
            class_fractions={int(k): float(v) for k, v in data["class_fractions"].items()},
        )


@dataclass(frozen=True)
class Fingerprint:
    """The labelled cases' statistics, sorted by name, with the datalist's modalities and labels."""

    cases: tuple[CaseStats, ...]
    modalities: tuple[str, ...]
    labels: dict[int, str]
    read: tuple[str, ...] = field(default=(), compare=False)  # cases DataAnalyzer read this time

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    def shapes_at(self, spacing: Sequence[float], cropped: bool = True) -> np.ndarray:
        """Each case's (cropped) shape in voxels once resampled to ``spacing``."""
        shapes = np.array([c.cropped_shape if cropped else c.shape for c in self.cases], dtype=np.float64)
        return shapes * self.spacings / np.asarray(spacing, dtype=np.float64)

    def foreground_intensity(self, channel: int) -> ChannelStats:
        """The training set's foreground statistics of one channel, pooled over cases.

        Mean and std are exact (each case weighted by its foreground voxels); DataAnalyzer keeps no
        voxels, so the 0.5/99.5 percentiles are the voxel-weighted means of the cases' own.
        """
        stats = [c.foreground[channel] for c in self.cases]
        weights = np.array([s.voxels for s in stats], dtype=np.float64)
        if weights.sum() == 0:
            raise ValueError("no case has labelled foreground: the foreground statistics are undefined")
        w = weights / weights.sum()
        means = np.array([s.mean for s in stats])
        mean = float((w * means).sum())
        second = float((w * (np.array([s.std for s in stats]) ** 2 + means**2)).sum())
        return ChannelStats(
            mean=mean,
            std=float(np.sqrt(max(second - mean**2, 0.0))),
            p00_5=float((w * np.array([s.p00_5 for s in stats])).sum()),
            p99_5=float((w * np.array([s.p99_5 for s in stats])).sum()),
            voxels=int(weights.sum()),
        )

    def total_voxels(self, spacing: Sequence[float]) -> float:
        """The dataset's voxels after cropping and resampling to ``spacing`` (the batch cap's base)."""
        return float(self.shapes_at(spacing).prod(axis=1).sum())


def fingerprint(
    datalist: str | Path, dataset_dir: str | Path | None = None, cache: str | Path | None = None
) -> Fingerprint:
    """The fingerprint of the datalist's labelled cases, read through the cache (``cache_path``)."""
    datalist = Path(datalist)
    root = Path(dataset_dir) if dataset_dir else datalist.resolve().parent
    entries = sorted(_labelled_cases(datalist, dataset_dir), key=lambda c: _case_name(c, root))
    if not entries:
        raise ValueError(f"datalist {datalist} has no labelled training cases to plan from")
    cache = Path(cache) if cache else cache_path(datalist)
    cached = _read_cache(cache)
    stamps = {_case_name(c, root): _stamp(c) for c in entries}
    fresh = {n: s["stats"] for n, s in cached.items() if n in stamps and s.get("stamp") == stamps[n]}
    stale = [c for c in entries if _case_name(c, root) not in fresh]
    if stale:
        logger.info("fingerprint: reading %d of %d cases with MONAI's DataAnalyzer", len(stale), len(entries))
        labels = LabelValuesd("label", label_values(datalist), len(label_names(datalist)))
        fresh.update({n: asdict(s) for n, s in analyse(stale, root, labels).items()})
        _write_cache(cache, {n: {"stamp": stamps[n], "stats": fresh[n]} for n in stamps})
    content = read_json(datalist)
    modalities = content.get("modality", {"0": "MRI"})
    return Fingerprint(
        cases=tuple(CaseStats.from_dict(fresh[n]) for n in stamps),
        modalities=tuple(str(modalities[k]) for k in sorted(modalities, key=int)),
        labels=label_names(datalist),
        read=tuple(_case_name(c, root) for c in stale),
    )


def analyse(entries: Sequence[dict], root: Path, labels: LabelValuesd | None = None) -> dict[str, CaseStats]:
    """DataAnalyzer's per-case statistics of ``entries`` (absolute paths), by case name; ``labels``
    maps label pixel values to classes as the bundles do (0/255 masks).

    DataAnalyzer logs and skips a case it cannot read; here that is an error naming the file.
    """
    analyzer = DataAnalyzer(
        {"training": [{"image": c["image"], "label": c["label"]} for c in entries]},
        dataroot="",
        output_path="",  # nothing written: the cache below is ours
        device="cpu",
        worker=0,
        do_ccp=False,  # connected components: slow, and no rule uses them
        hist_bins=0,
    )
    by_label = {str(c["label"]): c for c in entries}
    found = {}
    loading = _loading(labels or LabelValuesd("label"))
    for stats in analyzer.get_all_case_stats(transform_list=loading)["stats_by_cases"]:
        entry = by_label.get(str(stats["label_filepath"]))
        if entry is not None:
            found[_case_name(entry, root)] = _case_stats(_case_name(entry, root), stats)
    missing = [c for c in entries if _case_name(c, root) not in found]
    if missing:
        raise ValueError(
            f"fingerprint: MONAI's DataAnalyzer could not read {missing[0]['image']} with its label "
            f"{missing[0]['label']} ({len(missing)} case(s) failed; run `medseg check` for the reason)"
        )
    return found


def cache_path(datalist: str | Path) -> Path:
    """``<datalist stem>.fingerprint.json`` beside the datalist; when that folder is read-only (a
    shared dataset), a file named after the datalist's absolute path in the user's cache folder."""
    datalist = Path(datalist)
    if os.access(datalist.resolve().parent, os.W_OK):
        return datalist.with_name(datalist.stem + CACHE_SUFFIX)
    digest = hashlib.sha1(str(datalist.resolve()).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medseg"
    return base / f"{datalist.stem}-{digest}{CACHE_SUFFIX}"


def _labelled_cases(datalist: Path, dataset_dir: str | Path | None) -> list[dict]:
    return [c for c in datalist_cases(datalist, dataset_dir, role="all") if c.get("label")]


def _paths(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _case_name(entry: dict, root: Path) -> str:
    """The case's image path(s) relative to the dataset folder: the cache survives moving it."""
    names = []
    for path in _paths(entry["image"]):
        try:
            names.append(os.path.relpath(path, root))
        except ValueError:  # another drive (Windows)
            names.append(path)
    return " + ".join(names)


def _stamp(entry: dict) -> list:
    """Size and mtime of every file of the case (a DICOM series folder: of each of its files)."""
    stamp = []
    for path in [*_paths(entry["image"]), str(entry["label"])]:
        target = Path(split_series_path(path)[0])
        files = sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]
        for file in files:
            info = file.stat()
            stamp.append([file.name, info.st_size, info.st_mtime_ns])
    return stamp


def _ras_orientation(keys: list[str]) -> Callable[[dict], dict]:
    """Orientationd to RAS, or to RA for a 2D image (as the bundles' ``axcodes``: MONAI warns on codes
    longer than the image's dimension)."""

    def orient(data: dict) -> dict:
        return Orientationd(keys=keys, axcodes="RAS"[: data["image"].ndim - 1])(data)

    return orient


def _loading(labels: LabelValuesd) -> list:
    """DataAnalyzer's own loading steps, with the bundles' reader and label values."""
    keys = ["image", "label"]
    return [
        LoadImaged(keys=keys, reader=InputReader, ensure_channel_first=True, image_only=True),
        labels,
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float),
        _ras_orientation(keys),
        EnsureSameShaped(keys="label", source_key="image", allowed_shape_difference=5),
    ]


def _case_stats(name: str, stats: dict) -> CaseStats:
    image = stats["image_stats"]
    labels = stats["label_stats"]
    total = float(np.prod(image["shape"][0]))
    background = next(
        (lab for uid, lab in zip(labels["labels"], labels["label"], strict=True) if uid == 0), None
    )
    foreground_fraction = 1.0 - (background["foreground_percentage"] if background else 0.0)
    shape = tuple(int(s) for s in image["shape"][0])
    return CaseStats(
        name=name,
        # DataAnalyzer reads three spacings from any affine: a 2D image's third is its translation's
        spacing=tuple(float(s) for s in image["spacing"][: len(shape)]),
        shape=shape,
        cropped_shape=tuple(int(s) for s in image["cropped_shape"][0]),
        foreground=tuple(
            ChannelStats(
                mean=float(c["mean"]),
                std=float(c["stdev"]),
                p00_5=float(c["percentile_00_5"]),
                p99_5=float(c["percentile_99_5"]),
                voxels=round(foreground_fraction * total),
            )
            for c in stats["image_foreground_stats"]["intensity"]
        ),
        class_fractions={
            int(uid): float(lab["foreground_percentage"])
            for uid, lab in zip(labels["labels"], labels["label"], strict=True)
        },
    )


def _read_cache(path: Path) -> dict:
    """The cached cases, or none when the file is absent, unreadable or of another version."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("fingerprint cache %s unreadable (%s): reading every case again", path, error)
        return {}
    if not isinstance(content, dict) or content.get("version") != FINGERPRINT_VERSION:
        return {}
    return content.get("cases", {})


def _write_cache(path: Path, cases: dict) -> None:
    with atomic_write(path) as handle:
        handle.write((json.dumps({"version": FINGERPRINT_VERSION, "cases": cases}, indent=1) + "\n").encode())
