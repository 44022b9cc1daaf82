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

A 2D case (a label map whose shape is 2D once its axes of size 1 are dropped: an (H, W, 1) NIfTI)
also gets, per class, the two measures of the ISBI 2012 EM segmentation challenge (Arganda-Carreras
et al., Front. Neuroanat. 2015), which count what Dice hides in a thin-boundary image: a one-pixel
gap in a membrane merges two cells and barely moves Dice.

- pixel error: the fraction of pixels where the class's masks differ (``pixel_error``, 1 - pixel
  accuracy); for a binary task, that of the label map. Fiji's ``PixelError`` metric value, the mean
  squared difference of the binary images, is the same number (the leaderboard's "pixel error",
  1 - the best pixel F-score over thresholds of a probability map, is another one).
- Rand error: 1 - the foreground-restricted Rand F-score of ``rand_error``, with the class's
  4-connected components as the segments and every other pixel as the boundary between them. Label
  the objects (cells) as the class, as the challenge's files do (cell 255 -> 1, membrane 0 -> 0);
  with the membranes as the class it would score the components of the membrane net instead.
  The challenge took the best F over thresholds of a probability map; a saved label map has one.

3D cases get neither (``PLANAR_METRICS`` are None there), so a 3D report is unchanged; tables and
summaries show a planar metric only when every case has it.
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
from scipy import ndimage

METRICS = ("dice", "iou", "hd95", "asd")  # summarised; the volumes are reported per case only
PLANAR_METRICS = ("pixel_error", "rand_error")  # 2D cases only, also summarised
VOLUMES = ("pred_ml", "gt_ml")
EMPTY_RULE = (
    "A class empty in both ground truth and prediction scores Dice 1, IoU 1, HD95 0 mm and ASD 0 mm; "
    "a class empty in exactly one of them scores Dice 0, IoU 0, and HD95 = ASD = the diagonal of the "
    "volume in mm (the largest possible distance). No case is left out of a mean."
)
PLANAR_RULE = (
    "2D cases also get, per class, the ISBI 2012 EM challenge's pixel error (fraction of pixels whose "
    "class mask differs) and Rand error (1 - foreground-restricted Rand F-score of the class's "
    "4-connected components, over the ground truth's class pixels; predicted non-class pixels there "
    "count as one-pixel segments). A class absent from the ground truth has Rand error 0 if the "
    "prediction lacks it too, else 1."
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
    pixel_error: float | None = None  # the PLANAR_METRICS: None for a 3D case
    rand_error: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The scores this case has: a 3D case's ``metrics.json`` entry keeps its six keys."""
        return {name: value for name, value in asdict(self).items() if value is not None}


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
    y_pred, y = _batched(pred), _batched(truth)
    scores = {
        "dice": float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)),
        "iou": float(compute_iou(y_pred, y, include_background=True, ignore_empty=False)),
        "pred_ml": float(pred.sum()) * millilitres,
        "gt_ml": float(truth.sum()) * millilitres,
        **planar_scores(pred, truth),
    }
    if not pred.any() and not truth.any():
        return ClassScores(**scores, hd95=0.0, asd=0.0)
    if not pred.any() or not truth.any():
        farthest = volume_diagonal(truth.shape, spacing)
        return ClassScores(**scores, hd95=farthest, asd=farthest)
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(
        y_pred, y, include_background=True, symmetric=True, spacing=spacing
    )
    return ClassScores(**scores, hd95=float(hd95), asd=float(asd))


def planar_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel and Rand error of one class's masks when the case is 2D (see the module docstring); none
    for a 3D case, where a slice-wise Rand error would depend on the axis chosen."""
    shape = tuple(n for n in truth.shape if n != 1)
    if len(shape) != 2:
        return {}
    pred, truth = pred.astype(bool).reshape(shape), truth.astype(bool).reshape(shape)
    return {"pixel_error": pixel_error(pred, truth), "rand_error": rand_error(~pred, ~truth)}


def pixel_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """The fraction of pixels (voxels) whose predicted label differs from the ground truth's, for
    label maps or binary masks alike: 1 - pixel accuracy."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    return float(np.count_nonzero(pred != truth)) / truth.size if truth.size else 0.0


@dataclass(frozen=True)
class RandPairs:
    """Ordered pairs (a pixel with itself included) of the ground truth's segment pixels that lie in
    one segment of the truth (N^2 sum_i s_i^2), of the prediction (N^2 sum_j t_j^2) and of both
    (N^2 sum_ij p_ij^2), N being those pixels' count. Counts, not fractions, so that slices add up."""

    truth: int = 0
    pred: int = 0
    both: int = 0

    def __add__(self, other: RandPairs) -> RandPairs:
        return RandPairs(self.truth + other.truth, self.pred + other.pred, self.both + other.both)


def _same_segment_pairs(ids: np.ndarray) -> int:
    """sum over the distinct values of ``ids`` of (how often it occurs)^2."""
    counts = np.unique(ids, return_counts=True)[1].astype(np.int64)
    return int((counts * counts).sum())


def rand_pairs(pred_boundary: np.ndarray, truth_boundary: np.ndarray) -> RandPairs:
    """The pair counts of one 2D image: segments are the 4-connected components of the non-boundary
    pixels (Fiji's ``connectedComponents(..., 4)``), counted over the truth's segment pixels only.

    A pixel predicted boundary inside a truth segment is a segment of its own in the prediction: it
    adds 1 (itself) to ``pred`` and ``both``. This is Fiji's ``RandError.
    getForegroundRestrictedRandIndexStatsN2``, the ISBI 2012 script's (``sum(p_i0)/n`` added to
    sum_j t_j^2 and sum_ij p_ij^2), so that predicting boundary costs recall but never merges.
    """
    truth_segments, _ = ndimage.label(~truth_boundary)  # scipy's 2D default structure: 4-connected
    pred_segments, count = ndimage.label(~pred_boundary)
    inside = truth_segments > 0
    truth_ids, pred_ids = truth_segments[inside].astype(np.int64), pred_segments[inside].astype(np.int64)
    assigned = pred_ids > 0
    singletons = int(np.count_nonzero(~assigned))
    joint = truth_ids[assigned] * (count + 1) + pred_ids[assigned]
    return RandPairs(
        truth=_same_segment_pairs(truth_ids),
        pred=_same_segment_pairs(pred_ids[assigned]) + singletons,
        both=_same_segment_pairs(joint) + singletons,
    )


def rand_error(pred_boundary: np.ndarray, truth_boundary: np.ndarray) -> float:
    """The ISBI 2012 EM challenge's foreground-restricted Rand error, 1 - F, of boolean boundary masks
    (True: membrane, between segments), one 2D image or a stack of them along the last axis.

    With p_ij the joint distribution of (truth segment i, predicted segment j) over the truth's
    segment pixels, s_i and t_j its marginals: precision = sum p_ij^2 / sum t_j^2, recall =
    sum p_ij^2 / sum s_i^2, and F = 2PR / (P + R) = 2 sum p_ij^2 / (sum t_j^2 + sum s_i^2). A stack
    adds its slices' pair counts before F, as Fiji's ``getForegroundRestrictedRandIndexStats`` does.
    Booleans only: EM labels store membranes as 0, and a 0/255 array would pass for its inverse.
    A truth without segment pixels has no pairs: error 0 if the prediction has none either, else 1.
    """
    pred, truth = pred_boundary, truth_boundary
    if pred.dtype != bool or truth.dtype != bool:
        raise TypeError(f"boundary masks must be boolean, not {pred.dtype} and {truth.dtype}")
    if pred.shape != truth.shape or pred.ndim not in (2, 3):
        raise ValueError(f"need two 2D images or stacks of one shape, not {pred.shape} and {truth.shape}")
    if pred.ndim == 2:
        pred, truth = pred[..., None], truth[..., None]
    pairs = sum((rand_pairs(pred[..., k], truth[..., k]) for k in range(truth.shape[-1])), RandPairs())
    if pairs.truth == 0:
        return 0.0 if pred.all() else 1.0
    return 1.0 - 2.0 * pairs.both / (pairs.pred + pairs.truth)


def score_case(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], classes: Iterable[int]
) -> dict[int, ClassScores]:
    """Every foreground class of two label maps on one grid (``spacing``: mm per array axis)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    return {int(c): score_class(pred == c, truth == c, spacing) for c in classes}


def scored_metrics(cases: Iterable[Mapping[int, ClassScores]]) -> tuple[str, ...]:
    """``METRICS``, and each planar metric that every class of every case has (all cases 2D)."""
    scores = [s for c in cases for s in c.values()]
    planar = [m for m in PLANAR_METRICS if scores and all(getattr(s, m) is not None for s in scores)]
    return (*METRICS, *planar)


def class_means(scores: Mapping[int, ClassScores], metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Each metric's mean over the foreground classes of one case (the ``<metric>_mean`` columns)."""
    metrics = scored_metrics([scores]) if metrics is None else metrics
    return {m: statistics.fmean(getattr(s, m) for s in scores.values()) for m in metrics} if scores else {}


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
    metrics = scored_metrics(cases)
    summary = {}
    for index in sorted(cases[0]):
        summary[label_names[index]] = {m: describe([getattr(c[index], m) for c in cases]) for m in metrics}
    per_case_means = [class_means(c, metrics) for c in cases]
    summary["mean"] = {m: describe([means[m] for means in per_case_means]) for m in metrics}
    return summary
