"""How much of a dataset ``CacheDataset`` may hold in RAM: ``cache_rate: 1.0`` caches every case.

A whole training set at the target spacing can exceed the machine's memory (a few hundred CT
volumes are tens of GiB), and the cache fills before the first epoch: the run dies there, or
swaps. The estimate here is made from the headers only (no voxel is read): each case's image and
label shape resampled to the target spacing, every channel, float32. When the cache would take
more than a share of the available RAM, the cache rate is lowered to what fits, with a log line;
the uncached cases are then loaded and preprocessed on each epoch instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk

logger = logging.getLogger(__name__)

# Of the RAM available when the cache is built: the rest is for the network, the loader workers,
# augmentation and the validation cache.
RAM_SHARE = 0.5
FLOAT32 = 4


def available_ram() -> int | None:
    """MemAvailable (what can be allocated without swapping) in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _header(path: str) -> tuple[Sequence[int], Sequence[float], int]:
    """Size, spacing and components of a file, or of a DICOM series folder (its files' count as z)."""
    reader = sitk.ImageFileReader()
    if Path(path).is_dir():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path)
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        size, spacing = reader.GetSize(), reader.GetSpacing()
        return (*size[:2], len(files)), (*spacing[:2], 0.0), reader.GetNumberOfComponents()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), reader.GetNumberOfComponents()


def resampled_bytes(path: str, spacing: Sequence[float]) -> int:
    """float32 bytes of one file after resampling to ``spacing`` (an unknown spacing: kept as is)."""
    size, own, components = _header(path)
    channels = components * math.prod(size[3:])  # a 4D NIfTI holds its channels along the 4th axis
    voxels = math.prod(
        n * (s / t if s > 0 else 1.0) for n, s, t in zip(size[:3], own[:3], spacing, strict=False)
    )
    return int(voxels) * channels * FLOAT32


def case_bytes(case: Mapping[str, object], spacing: Sequence[float]) -> int:
    """What one cached case holds: every image file (one per channel, or one with all) and the label."""
    images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
    files = [str(p) for p in images] + ([str(case["label"])] if case.get("label") else [])
    return sum(resampled_bytes(path, spacing) for path in files)


def fitting_cache_rate(
    cases: Sequence[Mapping[str, object]],
    spacing: Sequence[float],
    cache_rate: float = 1.0,
    available: int | None = None,
) -> float:
    """``cache_rate``, or the smaller rate whose cache fits in ``RAM_SHARE`` of the available RAM.

    The mean case size is taken over the cases the cache would hold; ``available`` (bytes) defaults
    to MemAvailable. A header that cannot be read leaves the rate as it is: the data check names it.
    """
    cached = int(len(cases) * cache_rate)
    available = available_ram() if available is None else available
    if cached == 0 or available is None:
        return cache_rate
    try:
        per_case = [case_bytes(case, spacing) for case in cases[:cached]]
    except (RuntimeError, OSError, IndexError, KeyError):
        return cache_rate
    budget = available * RAM_SHARE
    if sum(per_case) <= budget:
        return cache_rate
    fits = int(budget // max(1, max(per_case)))
    rate = (fits + 0.5) / len(cases) if fits else 0.0  # CacheDataset caches int(len * rate) cases
    logger.warning(
        "cache_rate %g would hold %d cases, about %.2f GiB at spacing %s; %.0f%% of the %.2f GiB of RAM "
        "available is %.2f GiB: caching %d cases (cache_rate %.3f), the others are loaded each epoch",
        cache_rate, cached, sum(per_case) / 2**30, list(spacing), RAM_SHARE * 100, available / 2**30,
        budget / 2**30, fits, rate,
    )  # fmt: skip
    return rate
