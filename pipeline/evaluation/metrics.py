"""Per case and class: Dice, IoU, HD95 and average surface distance in mm, and both volumes in ml.

Distances are MONAI's (``compute_hausdorff_distance`` with ``percentile=95`` and the symmetric
``compute_average_surface_distance``), taken between the two masks' boundary voxels with the label's
voxel size as ``spacing``, so they are millimetres along every axis of an anisotropic volume. HD95 is
the larger of the two directed 95th percentiles; the average surface distance is the mean of all
boundary-to-boundary distances in both directions.

Empty masks (a class absent from the ground truth, the prediction, or both) make these metrics
undefined, and a NaN would silently drop the case from a mean. The rule, the same for every class:

- both empty: Dice 1, IoU 1, HD95 0 mm, ASD 0 mm (nothing to find, nothing found: a perfect answer);
- exactly one empty: Dice 0, IoU 0, and HD95 = ASD = the diagonal of the volume in mm, the largest
  distance two points of that volume can have (a miss or a false alarm is the worst answer).

Dice and IoU follow it through MONAI's ``ignore_empty=False``, which the evaluate workflow's
MeanDice and MeanIoU handlers use too, so ``metrics.csv`` and ``per_case.csv`` agree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)

METRICS = ("dice", "iou", "hd95", "asd")  # summarised; the volumes are reported per case only
VOLUMES = ("pred_ml", "gt_ml")
EMPTY_RULE = (
    "A class empty in both ground truth and prediction scores Dice 1, IoU 1, HD95 0 mm and ASD 0 mm; "
    "a class empty in exactly one of them scores Dice 0, IoU 0, and HD95 = ASD = the diagonal of the "
    "volume in mm (the largest possible distance). No case is left out of a mean."
)


@dataclass(frozen=True)
class ClassScores:
    """One class of one case; distances in mm, volumes in ml."""

    dice: float
    iou: float
    hd95: float
    asd: float
    pred_ml: float
    gt_ml: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The largest distance between two voxels' corners of the volume, in mm."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def _batched(mask: np.ndarray) -> torch.Tensor:
    """A binary mask as MONAI's metric functions take it: batch and channel of one."""
    return torch.as_tensor(mask[None, None], dtype=torch.float32)


def score_class(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> ClassScores:
    """The scores of one class's binary masks (same grid), under the module's empty-mask rule."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    spacing = [float(s) for s in spacing]
    millilitres = float(np.prod(spacing)) / 1000.0
    volumes = {"pred_ml": float(pred.sum()) * millilitres, "gt_ml": float(truth.sum()) * millilitres}
    y_pred, y = _batched(pred), _batched(truth)
    overlap = {
        "dice": float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)),
        "iou": float(compute_iou(y_pred, y, include_background=True, ignore_empty=False)),
    }
    if not pred.any() and not truth.any():
        return ClassScores(**overlap, hd95=0.0, asd=0.0, **volumes)
    if not pred.any() or not truth.any():
        farthest = volume_diagonal(truth.shape, spacing)
        return ClassScores(**overlap, hd95=farthest, asd=farthest, **volumes)
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(
        y_pred, y, include_background=True, symmetric=True, spacing=spacing
    )
    return ClassScores(**overlap, hd95=float(hd95), asd=float(asd), **volumes)


def score_case(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], classes: Iterable[int]
) -> dict[int, ClassScores]:
    """Every foreground class of two label maps on one grid (``spacing``: mm per array axis)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    return {int(c): score_class(pred == c, truth == c, spacing) for c in classes}


def class_means(scores: Mapping[int, ClassScores]) -> dict[str, float]:
    """Each metric's mean over the foreground classes of one case (the ``<metric>_mean`` columns)."""
    return {m: statistics.fmean(getattr(s, m) for s in scores.values()) for m in METRICS} if scores else {}


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and sample standard deviation (0 for a single case)."""
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(cases: Sequence[Mapping[int, ClassScores]], label_names: Mapping[int, str]) -> dict:
    """``{class name or "mean": {metric: {mean, median, std}}}`` over the cases."""
    if not cases:
        return {}
    summary = {}
    for index in sorted(cases[0]):
        summary[label_names[index]] = {m: describe([getattr(c[index], m) for c in cases]) for m in METRICS}
    per_case_means = [class_means(c) for c in cases]
    summary["mean"] = {m: describe([means[m] for means in per_case_means]) for m in METRICS}
    return summary
