"""Metrics on shapes whose Dice, IoU and surface distances are known in closed form.

Two slabs of L x M voxels, 2 voxels thick (so every voxel is a boundary voxel: MONAI's boundary is
the mask minus its erosion), the second shifted by k voxels along axis ``a`` of spacing s_a:

- overlap (L - k) M 2 of L M 2 voxels each: Dice = 2(L - k) / 2L = 1 - k/L, IoU = (L - k) / (L + k);
- a boundary voxel of one slab at x lies 0 from the other slab where they overlap (L - k of the L
  positions along ``a``) and j s_a away at the j-th position past its end (j = 1..k), in both
  directions alike. With L = 10, the largest distance k s_a holds 1/L = 10 % > 5 % of the distances,
  so HD95 = k s_a; the symmetric mean is ASD = s_a (1 + ... + k) / L = s_a k (k + 1) / (2 L).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    ClassScores,
    score_case,
    score_class,
    summarise,
    volume_diagonal,
)

SPACING = (0.8, 1.1, 3.0)
SHAPE = (40, 36, 30)
L, M = 10, 8


def slab(axis: int, offset: int) -> np.ndarray:
    """An L-long, M-wide, 2-thick box starting ``offset`` voxels further along ``axis``."""
    thin = 1 if axis != 1 else 0
    mask = np.zeros(SHAPE, dtype=bool)
    index = [slice(4, 4 + M)] * 3
    index[thin] = slice(4, 6)
    index[axis] = slice(4 + offset, 4 + offset + L)
    mask[tuple(index)] = True
    return mask


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_offset_slabs_have_the_closed_form_scores(axis: int, k: int) -> None:
    scores = score_class(slab(axis, k), slab(axis, 0), SPACING)
    assert scores.dice == pytest.approx(1 - k / L)
    assert scores.iou == pytest.approx((L - k) / (L + k))
    assert scores.hd95 == pytest.approx(k * SPACING[axis], rel=1e-5)
    assert scores.asd == pytest.approx(SPACING[axis] * k * (k + 1) / (2 * L), rel=1e-5)


def test_distances_follow_the_spacing_of_the_shifted_axis() -> None:
    """The same voxel shift is 3 mm across slices but 0.8 mm in-plane: anisotropy is honoured."""
    across = score_class(slab(2, 1), slab(2, 0), SPACING)
    in_plane = score_class(slab(0, 1), slab(0, 0), SPACING)
    assert across.hd95 == pytest.approx(3.0, rel=1e-5) and in_plane.hd95 == pytest.approx(0.8, rel=1e-5)


def test_volumes_are_in_millilitres() -> None:
    scores = score_class(slab(0, 3), slab(0, 0) | slab(0, 20), SPACING)
    voxel_ml = math.prod(SPACING) / 1000
    assert scores.pred_ml == pytest.approx(L * M * 2 * voxel_ml)
    assert scores.gt_ml == pytest.approx(2 * L * M * 2 * voxel_ml)


def test_identical_masks_score_perfectly() -> None:
    scores = score_class(slab(1, 0), slab(1, 0), SPACING)
    assert (scores.dice, scores.iou, scores.hd95, scores.asd) == (1.0, 1.0, 0.0, 0.0)


def test_empty_masks_follow_the_documented_rule() -> None:
    empty, box = np.zeros(SHAPE, dtype=bool), slab(0, 0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING, strict=True)))
    assert volume_diagonal(SHAPE, SPACING) == pytest.approx(diagonal)
    both = score_class(empty, empty, SPACING)
    assert (both.dice, both.iou, both.hd95, both.asd, both.pred_ml, both.gt_ml) == (1, 1, 0, 0, 0, 0)
    for pred, truth in ((empty, box), (box, empty)):
        one = score_class(pred, truth, SPACING)
        assert (one.dice, one.iou) == (0.0, 0.0)
        assert one.hd95 == pytest.approx(diagonal) and one.asd == pytest.approx(diagonal)


def test_score_case_scores_each_class_of_two_label_maps() -> None:
    truth = slab(0, 0).astype(np.int32) + 2 * slab(0, 20)
    pred = slab(0, 1).astype(np.int32)  # class 2 missed entirely
    scores = score_case(pred, truth, SPACING, [1, 2])
    assert scores[1].dice == pytest.approx(1 - 1 / L) and scores[2].dice == 0.0
    with pytest.raises(ValueError, match="shape"):
        score_case(pred[:-1], truth, SPACING, [1])


def test_summary_has_mean_median_std_and_no_nan() -> None:
    def case(dice: float) -> dict[int, ClassScores]:
        return {
            1: ClassScores(dice, dice, 2 * dice, dice, 1.0, 1.0),
            2: ClassScores(1.0, 1.0, 0.0, 0.0, 0, 0),
        }

    summary = summarise([case(0.2), case(0.4), case(0.9)], {0: "bg", 1: "organ", 2: "core"})
    assert summary["organ"]["dice"] == pytest.approx(
        {"mean": 0.5, "median": 0.4, "std": np.std([0.2, 0.4, 0.9], ddof=1)}
    )
    assert summary["organ"]["hd95"]["median"] == pytest.approx(0.8)
    assert summary["core"]["dice"] == {"mean": 1.0, "median": 1.0, "std": 0.0}
    assert summary["mean"]["dice"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert not any(
        math.isnan(v)
        for per_metric in summary.values()
        for stats in per_metric.values()
        for v in stats.values()
    )
