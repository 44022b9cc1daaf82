"""Where runs go and how they are named, against a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import add_to_run, default_tracking_uri, new_run_name
from pipeline.tracking.store import local_store


def test_run_names_never_repeat() -> None:
    names = {new_run_name("unet3d-train") for _ in range(20)}
    assert len(names) == 20 and all(name.startswith("unet3d-train-") for name in names)


def test_tracking_uri_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri() == f"sqlite:///{local_store()}"


def test_files_and_tags_reach_the_named_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo-data", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="unet3d-evaluate-1")
    report = tmp_path / "per_case.csv"
    report.write_text("case,dice_mean\na,0.9\n")
    run_id = add_to_run("demo-data", "unet3d-evaluate-1", [report], {"training_run": "unet3d-train-1"}, uri)
    assert run_id == run.info.run_id
    assert [a.path for a in client.list_artifacts(run_id)] == ["per_case.csv"]
    assert client.get_run(run_id).data.tags["training_run"] == "unet3d-train-1"
    with pytest.raises(ValueError, match="no MLflow run named 'other'"):
        add_to_run("demo-data", "other", tracking_uri=uri)
