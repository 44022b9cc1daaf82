"""Scoring segmentations already on disk, without a network: ``medseg evaluate --predictions DIR``.

A prediction is matched to its case by the project's case-name rule, as inference names it:
``<case>_seg.nii.gz`` for the image ``<case>.nii.gz``, or ``<folder>_<case>_seg.nii.gz`` where cases
of the split share a file name (``pipeline.io.readers.output_names``). Prediction and label must lie
on one grid (inference writes in the input's space, and a label shares its image's grid); the
label's affine gives the voxel size. The outputs are the evaluate workflow's (``pipeline.evaluation.report``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.datalist import cases, label_names, modality
from pipeline.evaluation.metrics import ClassScores, score_case
from pipeline.evaluation.outputs import write_evaluation
from pipeline.evaluation.report import CaseResult
from pipeline.io.geometry import Grid, grid_mismatch
from pipeline.io.names import case_name
from pipeline.io.readers import output_names

PREDICTION_SUFFIX = "_seg.nii.gz"


def load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxels and affine of a segmentation; a trailing singleton axis is dropped."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"{path} cannot be read as NIfTI: {error}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path} is not a 3D segmentation (shape {data.shape})")
    return np.rint(data).astype(np.int32), image.affine


def require_same_grid(
    pred: Path,
    pred_grid: tuple[np.ndarray, np.ndarray],
    label: Path,
    label_grid: tuple[np.ndarray, np.ndarray],
) -> None:
    """One voxel grid for both, or a clear error: a metric across grids would compare unrelated voxels."""
    (pred_data, pred_affine), (truth, truth_affine) = pred_grid, label_grid
    problem = grid_mismatch(Grid(pred_data.shape, pred_affine), Grid(truth.shape, truth_affine))
    if problem:
        raise ValueError(
            f"{pred} is not on the voxel grid of its label {label} ({problem}): resample it onto the label"
        )


def prediction_files(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    """Case name -> prediction file, every missing one named at once."""
    if not folder.is_dir():
        raise FileNotFoundError(f"predictions folder {folder} does not exist")
    files = {name: folder / f"{name}{PREDICTION_SUFFIX}" for name in names}
    missing = [str(path.name) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {len(missing)} of {len(names)} predictions: {', '.join(missing)}"
        )
    return files


def score_files(prediction: Path, label: Path, classes: Sequence[int]) -> dict[int, ClassScores]:
    pred, truth = load_label_map(prediction), load_label_map(label)
    require_same_grid(prediction, pred, label, truth)
    spacing = nib.affines.voxel_sizes(truth[1])[:3]
    return score_case(pred[0], truth[0], spacing, classes)


def evaluate_predictions(
    predictions: str | Path,
    datalist: str | Path,
    output_dir: str | Path,
    split: str = "test",
    val_fold: int = 0,
    dataset_dir: str | Path | None = None,
) -> Path:
    """Score ``<predictions>/<case>_seg.nii.gz`` against the labels of a datalist split; returns
    ``output_dir``, which then holds ``per_case.csv``, ``metrics.json`` and ``report.html``."""
    entries = cases(datalist, dataset_dir, role=split, val_fold=val_fold)
    if not entries:
        raise ValueError(f"datalist {datalist} has no {split} cases")
    unlabelled = [case_name(Path(e["image"])) for e in entries if not e.get("label")]
    if unlabelled:
        raise ValueError(f"datalist {datalist}: {split} cases without a label: {', '.join(unlabelled)}")
    names = label_names(datalist)
    classes = [i for i in sorted(names) if i > 0]
    case_names = output_names([entry["image"] for entry in entries])
    files = prediction_files(Path(predictions), case_names)
    results = []
    for entry, name in zip(entries, case_names, strict=True):
        scores = score_files(files[name], Path(entry["label"]), classes)
        results.append(
            CaseResult(name, {"predictions": scores}, entry["image"], entry["label"], str(files[name]))
        )
    write_evaluation(
        output_dir, sorted(results, key=lambda r: r.case), names,
        modality=modality(datalist), title=f"Evaluation of {Path(predictions).name} ({split})",
    )  # fmt: skip
    return Path(output_dir)
