"""A DICOM dataset through the whole pipeline: datalist, check, train, inference (NIfTI and DICOM SEG),
evaluate, with MLflow tracking that must never carry a patient identifier."""

from __future__ import annotations

import hashlib
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import phantom, tiny
from dicom_factory import IDENTIFIERS, expected_affine, write_series
from mlflow.tracking import MlflowClient
from mlflow_artifacts import all_runs, leaks

from pipeline.data.build import build_datalist
from pipeline.data.check import check_datalist
from pipeline.inference.batch import CaseFailures
from pipeline.workflows import evaluate, infer, train

GEOMETRY = {"spacing": (1.2, 1.2, 1.5), "origin": (-30.0, -20.0, 10.0), "row_direction": (1, 0, 0)}
GEOMETRY["column_direction"] = (0, 0.9397, -0.3420)  # a 20-degree oblique series
UID_NAMED = "1.2.826.0.1.3680043.8.498.1234567890"


@pytest.fixture(scope="module")
def dicom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom_dataset")
    rng = np.random.default_rng(3)
    affine = expected_affine(**GEOMETRY, ras=True)
    for index in range(4):
        image, label = phantom((40, 44, 36), rng)
        case = f"case{index}" if index else UID_NAMED  # a folder named by its series UID, as many are
        stored = np.clip(image + 1024, 0, 4000).astype(np.int16)  # intercept -1024 gives the image back
        uid = None if index else UID_NAMED
        write_series(
            root / "images" / case, stored, **GEOMETRY, intercept=-1024.0, modality="MR", series_uid=uid
        )
        (root / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{case}.nii.gz")
    return build_datalist(root, root / "datalist.json", folds=2, labels=["background", "organ", "core"])


@pytest.fixture(scope="module")
def pipeline_run(dicom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dicom_run")
    settings = {**tiny("unet3d"), "tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "overlay_every": 1}
    settings["val_fold"] = 1  # the fold of the series folder named by its UID: it is validated and scored
    models = train("unet3d", dicom_dataset, root / "train", epochs=1, overrides=settings, plan=False)
    series = dicom_dataset.parent / "images" / "case1"
    predictions = infer(
        "unet3d", [series], root / "predictions", models / "model.pt", {**settings, "dicom_seg": True}
    )
    evaluation = evaluate(
        "unet3d", dicom_dataset, root / "evaluation", models / "model.pt", "validation", settings
    )
    return {"root": root, "series": series, "predictions": predictions, "evaluation": evaluation, **settings}


def test_the_dicom_datalist_passes_the_check(dicom_dataset: Path) -> None:
    assert [f for f in check_datalist(dicom_dataset) if f.severity == "error"] == []


def test_inference_writes_nifti_in_the_series_space_and_a_seg_over_it(pipeline_run: dict) -> None:
    (nifti,) = sorted(pipeline_run["predictions"].glob("*.nii.gz"))
    prediction = nib.load(nifti)
    assert prediction.shape == (40, 44, 36)
    np.testing.assert_allclose(prediction.affine, expected_affine(**GEOMETRY, ras=True), atol=1e-3)
    (seg_file,) = sorted(pipeline_run["predictions"].glob("*.dcm"))
    seg = highdicom.seg.segread(seg_file)
    source_uid = pydicom.dcmread(
        next(pipeline_run["series"].iterdir()), stop_before_pixels=True
    ).SeriesInstanceUID
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid


def test_evaluation_scores_dicom_cases(pipeline_run: dict) -> None:
    table = (pipeline_run["evaluation"] / "per_case.csv").read_text().splitlines()
    assert table[0].startswith("case,dice_organ,dice_core") and len(table) == 3


def test_no_patient_identifier_or_path_reaches_mlflow(
    pipeline_run: dict, dicom_dataset: Path, tmp_path: Path
) -> None:
    """Tag values, series and study UIDs and the folders' paths, in every artifact (PNG and HTML too),
    param, tag and name of every run."""
    client = MlflowClient(pipeline_run["tracking_uri"])
    assert {r.data.tags["workflow"] for r in all_runs(client)} == {"train", "inference", "evaluate"}
    header = pydicom.dcmread(next(pipeline_run["series"].iterdir()), stop_before_pixels=True)
    secrets = [*IDENTIFIERS.values(), header.SeriesInstanceUID, header.StudyInstanceUID, UID_NAMED]
    secrets += [str(dicom_dataset.parent.resolve()), str(pipeline_run["root"].resolve())]
    assert leaks(pipeline_run["tracking_uri"], secrets, tmp_path) == []
    cases = [
        line.split(",")[0] for line in (pipeline_run["evaluation"] / "per_case.csv").read_text().splitlines()
    ]
    assert f"series_{hashlib.sha256(UID_NAMED.encode()).hexdigest()[:8]}" in cases, "scored, under a hash"


def test_inference_skips_a_bad_input_with_one_line_and_segments_the_rest(
    pipeline_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    checkpoint = pipeline_run["root"] / "train" / "models" / "model.pt"
    settings = {key: value for key, value in pipeline_run.items() if key in {*tiny("unet3d"), "tracking_uri"}}
    with caplog.at_level("ERROR", logger="pipeline.workflows"), pytest.raises(CaseFailures) as failed:
        infer("unet3d", [broken, pipeline_run["series"]], tmp_path / "out", checkpoint, settings)
    (skipped,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.workflows"]
    assert skipped.startswith(f"skipping {broken}: ") and "\n" not in skipped
    assert [f.case for f in failed.value.failures] == [str(broken)], "listed again at the end"
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
