"""Pixel error and the ISBI 2012 foreground-restricted Rand error on images small enough to count by hand.

The example (1 = cell, 0 = membrane), two truth cells A (8 px, left) and B (4 px, right), N = 12:

    truth      merged     split
    1 1 0 1    1 1 1 1    1 1 0 1
    1 1 0 1    1 1 1 1    0 0 0 1
    1 1 0 1    1 1 1 1    1 1 0 1
    1 1 0 1    1 1 1 1    1 1 0 1

In pixel pairs (ordered, a pixel with itself included) over the 12 truth cell pixels: same truth
segment sum_i s_i^2 = 8^2 + 4^2 = 80, and F = 2 sum p_ij^2 / (sum t_j^2 + sum s_i^2).

- merged: one predicted segment holds all 12, sum t_j^2 = 144, sum p_ij^2 = 8^2 + 4^2 = 80:
  F = 160 / 224 = 5/7, Rand error 2/7; pixel error 4/16 (the membrane column).
- split: predicted segments of 2 (top of A), 4 (bottom of A) and 4 (B) pixels, and 2 truth pixels
  predicted membrane, each a segment of its own (1 pair each): sum t_j^2 = 4 + 16 + 16 + 2 = 38 =
  sum p_ij^2, so precision 1 and F = 76 / 118 = 38/59, Rand error 21/59; pixel error 2/16. Were the
  two membrane pixels one segment (4 pairs), F would be 80 / 120 and the error 1/3.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image
from scipy import ndimage

from pipeline.evaluation import evaluate_predictions
from pipeline.evaluation.metrics import (
    METRICS,
    pixel_error,
    rand_error,
    score_case,
    summarise,
)
from pipeline.evaluation.report import CaseResult, summary_lines, variant_metrics

TRUTH = np.array([[1, 1, 0, 1]] * 4, dtype=np.uint8)
MERGED = np.ones((4, 4), dtype=np.uint8)
SPLIT = TRUTH.copy()
SPLIT[1, :2] = 0
EM_LABELS = SHARED_DATA / "isbi2012_em" / "label"


def membrane(cells: np.ndarray) -> np.ndarray:
    return cells == 0


def brute_force_rand_error(pred_boundary: np.ndarray, truth_boundary: np.ndarray) -> float:
    """The definition pair by pair: every ordered pair of truth segment pixels, predicted boundary
    pixels each a segment of its own."""
    truth_ids = ndimage.label(~truth_boundary)[0]
    inside = truth_ids > 0
    truth_ids, pred_ids = truth_ids[inside], ndimage.label(~pred_boundary)[0][inside].astype(np.int64)
    unassigned = pred_ids == 0
    pred_ids[unassigned] = -np.arange(1, unassigned.sum() + 1)
    same_truth = truth_ids[:, None] == truth_ids[None, :]
    same_pred = pred_ids[:, None] == pred_ids[None, :]
    both = (same_truth & same_pred).sum()
    precision, recall = both / same_pred.sum(), both / same_truth.sum()
    return 1 - 2 * precision * recall / (precision + recall)


def test_identical_segmentations_score_zero() -> None:
    assert rand_error(membrane(TRUTH), membrane(TRUTH)) == 0.0
    assert pixel_error(TRUTH, TRUTH) == 0.0


def test_a_merge_has_the_hand_computed_errors() -> None:
    assert rand_error(membrane(MERGED), membrane(TRUTH)) == pytest.approx(2 / 7)
    assert pixel_error(MERGED, TRUTH) == pytest.approx(4 / 16)


def test_a_split_counts_predicted_membrane_pixels_as_single_pixel_segments() -> None:
    assert rand_error(membrane(SPLIT), membrane(TRUTH)) == pytest.approx(21 / 59)
    assert pixel_error(SPLIT, TRUTH) == pytest.approx(2 / 16)


def test_pixel_error_of_a_label_map_is_the_fraction_of_differing_labels() -> None:
    pred = np.array([[0, 1, 2], [2, 1, 0]])
    truth = np.array([[0, 1, 1], [2, 2, 0]])  # (0, 2) and (1, 1) differ: 2 of 6
    assert pixel_error(pred, truth) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="shape"):
        pixel_error(pred[:, :2], truth)


def test_diagonal_contact_does_not_join_segments() -> None:
    """4-connectivity, as Fiji labels components: with 8 the prediction would merge the two cells
    (error 1/3)."""
    truth = np.eye(3, dtype=bool)
    truth[1, 1] = False
    assert rand_error(~np.eye(3, dtype=bool), ~truth) == 0.0


def test_a_stack_adds_pair_counts_before_the_f_score() -> None:
    """Slices (identical, merged): pairs 80 + 80 in the truth, 80 + 144 in the prediction, 80 + 80 in
    both, F = 320 / 384 = 5/6: an error of 1/6, not the slices' mean error 1/7."""
    truth = np.stack([membrane(TRUTH)] * 2, axis=-1)
    pred = np.stack([membrane(TRUTH), membrane(MERGED)], axis=-1)
    assert rand_error(pred, truth) == pytest.approx(1 / 6)


def test_boundary_masks_must_be_boolean_and_an_empty_truth_has_a_rule() -> None:
    with pytest.raises(TypeError, match="boolean"):
        rand_error(TRUTH, TRUTH)  # 0/1 cells passed as boundaries would score the membrane net
    all_membrane = np.ones((4, 4), dtype=bool)
    assert rand_error(all_membrane, all_membrane) == 0.0
    assert rand_error(membrane(TRUTH), all_membrane) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_rand_error_matches_the_pair_by_pair_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, pred = rng.random((2, 9, 9)) < 0.35
    assert rand_error(pred, truth) == pytest.approx(brute_force_rand_error(pred, truth))


@pytest.mark.skipif(not EM_LABELS.is_dir(), reason="../shared/data/isbi2012_em is absent")
def test_rand_error_on_a_real_em_label_matches_the_definition() -> None:
    """A 48 x 48 crop of the challenge's first label (0 membrane, 255 cell), against its membranes
    thinned by three pixels, which opens gaps between cells."""
    label = np.asarray(Image.open(EM_LABELS / "0.png"))[100:148, 100:148]
    truth = label == 0
    thinned = ndimage.binary_erosion(truth, iterations=3)
    error = rand_error(thinned, truth)
    assert 0 < error < 1 and error == pytest.approx(brute_force_rand_error(thinned, truth))
    assert rand_error(truth, truth) == 0.0


def test_only_2d_cases_get_the_planar_metrics() -> None:
    flat = score_case(MERGED[..., None], TRUTH[..., None], (1.0, 1.0, 1.0), [1])[1]
    assert flat.pixel_error == pytest.approx(4 / 16) and flat.rand_error == pytest.approx(2 / 7)
    volume = score_case(np.ones((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8), (1.0,) * 3, [1])[1]
    assert set(volume.as_dict()) == {"dice", "iou", "hd95", "asd", "pred_ml", "gt_ml"}
    mixed = summarise([{1: flat}, {1: volume}], {0: "membrane", 1: "cell"})
    assert list(mixed["cell"]) == list(METRICS)
    assert variant_metrics([CaseResult("a", {"v": {1: volume}})], "v") == METRICS
    assert list(summarise([{1: flat}], {1: "cell"})["cell"])[-2:] == ["pixel_error", "rand_error"]


def write_case(folder: Path, name: str, cells: np.ndarray) -> Path:
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(cells[..., None].astype(np.uint8), np.eye(4)), path)
    return path


def test_the_report_of_a_2d_evaluation_shows_pixel_and_rand_error(tmp_path: Path) -> None:
    """Two (4, 4, 1) cases: ``merged`` (errors 1/4 and 2/7) and ``same`` (0 and 0)."""
    for folder in ("images", "labels", "predictions"):
        (tmp_path / folder).mkdir()
    entries = []
    for name, pred in (("merged", MERGED), ("same", TRUTH)):
        write_case(tmp_path / "images", name, TRUTH * 100.0)
        write_case(tmp_path / "labels", name, TRUTH)
        write_case(tmp_path / "predictions", f"{name}_seg", pred)
        entries.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    datalist = tmp_path / "datalist.json"
    labels = {"0": "membrane", "1": "cell"}
    datalist.write_text(json.dumps({"modality": {"0": "EM"}, "labels": labels, "test": entries}))
    out = evaluate_predictions(tmp_path / "predictions", datalist, tmp_path / "evaluation", split="test")

    with (out / "per_case.csv").open() as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert float(rows["merged"]["pixel_error_cell"]) == 0.25
    assert float(rows["merged"]["rand_error_cell"]) == pytest.approx(2 / 7, abs=1e-6)
    assert float(rows["merged"]["rand_error_mean"]) == float(rows["merged"]["rand_error_cell"])
    assert float(rows["same"]["rand_error_cell"]) == 0.0 == float(rows["same"]["pixel_error_mean"])
    document = json.loads((out / "metrics.json").read_text())
    summary = document["variants"]["predictions"]["summary"]["cell"]
    assert summary["rand_error"]["mean"] == pytest.approx(1 / 7)
    assert summary["pixel_error"]["median"] == pytest.approx(1 / 8)
    assert "Rand error" in document["planar_rule"]
    page = (out / "report.html").read_text()
    assert "<td>Rand error</td>" in page and "<td>pixel error</td>" in page
    assert "rand_error_cell" in page and "1 - foreground-restricted Rand F-score" in page
    lines = summary_lines(document)
    assert "Pixel err" in lines[1] and "Rand err" in lines[1]
    assert lines[2].split()[-2:] == [f"{1 / 8:.4f}", f"{1 / 7:.4f}"]
