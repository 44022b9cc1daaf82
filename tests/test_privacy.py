"""What reaches MLflow: no file path, metric names MLflow accepts whatever the label names, a refused
request that is no lost server, run names reopened only by their own run folder, and overlays of a short
training. Real trainings into a real SQLite store (an evaluation's files: tests/test_tracking_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny, write_dataset
from ignite.engine import Engine
from mlflow.tracking import MlflowClient
from mlflow_artifacts import all_runs, artifact_files, executed_config, leaks

from pipeline.tracking import RunTracker
from pipeline.tracking.safe import REDACTED, redact_config
from pipeline.workflows import train

RUN_NAME = "it's mine"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two trainings of one run name in two folders (2 and 1 epochs); the label ``kidney (left)`` is no
    valid MLflow metric name as it stands."""
    data = tmp_path_factory.mktemp("private_data")
    datalist = write_dataset(data)
    content = json.loads(datalist.read_text())
    content["labels"] = {"0": "background", "1": "kidney (left)", "2": "core"}
    datalist.write_text(json.dumps(content))
    root = tmp_path_factory.mktemp("private_runs")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    settings = {**tiny("unet3d"), "tracking_uri": uri, "run_name": RUN_NAME, "overlay_every": 5}
    train("unet3d", datalist, root / "first", epochs=2, overrides=settings, plan=False)
    train("unet3d", datalist, root / "second", epochs=1, overrides=settings, plan=False)
    client = MlflowClient(uri)
    trainings = sorted(
        (r for r in all_runs(client) if r.data.tags["workflow"] == "train"), key=lambda r: r.info.start_time
    )
    return {"uri": uri, "client": client, "trainings": trainings, "data": data, "root": root}


def test_an_odd_label_name_is_tracked_under_a_name_mlflow_accepts(tracked: dict) -> None:
    client, first = tracked["client"], tracked["trainings"][0]
    assert first.info.status == "FINISHED", "tracking went on to the end"
    history = client.get_metric_history(first.info.run_id, "val_dice_kidney _left_")
    assert [m.step for m in history] == [1, 2]


def test_a_short_training_has_overlays_of_its_first_and_last_validation(tracked: dict) -> None:
    overlays = {
        p for p in artifact_files(tracked["client"], tracked["trainings"][0].info.run_id) if "overlays/" in p
    }
    expected = {f"overlays/case{case}_epoch{epoch:04d}.png" for case in (0, 1) for epoch in (1, 2)}
    assert overlays == expected, "overlay_every 5, 2 epochs: the first and the last validation"


def test_the_same_run_name_in_another_folder_is_another_run(tracked: dict) -> None:
    client, (first, second) = tracked["client"], tracked["trainings"]
    assert first.info.run_name == second.info.run_name == RUN_NAME
    assert first.info.run_id != second.info.run_id
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val_mean_dice")] == [1, 2]
    assert [m.step for m in client.get_metric_history(second.info.run_id, "val_mean_dice")] == [1]
    assert first.data.params["max_epochs"] == "2" and second.data.params["max_epochs"] == "1"


def test_no_file_path_reaches_mlflow(tracked: dict, tmp_path: Path) -> None:
    paths = [str(tracked["data"].resolve()), str(tracked["root"].resolve())]
    assert leaks(tracked["uri"], paths, tmp_path) == []
    saved = executed_config(tracked["client"], tracked["trainings"][0].info.run_id, tmp_path)
    assert saved["datalist"] == "datalist.json" and saved["tracking_uri"] == f"sqlite://{REDACTED}"


def test_a_config_loses_paths_and_credentials() -> None:
    config = {
        "datalist": "/data/set/datalist.json",
        "input": ["/data/set/imagesTs/a.nii.gz", "/home/jane/b.nii.gz"],
        "checkpoint": "/home/jane/runs/model.pt",
        "tracking_uri": "https://jane:secret@mlflow.example.org:5000/path",
        "output_dir": "$'/home/jane/runs' + '/eval'",
        "spacing": [1.5, 1.5, 1.5],
    }
    public = redact_config(config, "/data/set")
    assert public["input"] == ["imagesTs/a.nii.gz", REDACTED] and public["checkpoint"] == REDACTED
    assert public["tracking_uri"] == "https://mlflow.example.org:5000" and public["spacing"] == [
        1.5,
        1.5,
        1.5,
    ]
    assert "/home/jane" not in json.dumps(public) and config["checkpoint"] == "/home/jane/runs/model.pt"


def test_a_refused_request_is_no_lost_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = RunTracker(tracking_uri=uri, experiment_name="refusals", run_name="r", run_folder=str(tmp_path))
    engine = Engine(lambda engine, batch: None)
    tracker.start(engine)
    run_id = tracker.cur_run.info.run_id
    tracker._safely(tracker.client.log_param, run_id, "seed", "1")
    with caplog.at_level("WARNING", logger="pipeline.tracking.handlers"):
        tracker._safely(tracker.client.log_param, run_id, "seed", "2")  # MLflow refuses a changed param
    assert "refused a request" in caplog.text and not tracker.lost
    tracker._log_metrics({"loss": 0.5}, step=1)
    tracker.close()
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["loss"] == 0.5 and run.info.status == "FINISHED"
