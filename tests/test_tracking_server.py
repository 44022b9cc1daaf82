"""The full MLflow record against a real `mlflow server` on localhost, and what happens when it goes away."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny
from mlflow.tracking import MlflowClient
from mlflow_artifacts import artifact_files, executed_config, leaks

from pipeline.tracking import TrackingUnavailable
from pipeline.workflows import PROJECT_ROOT, evaluate, train

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    # its own process group: `mlflow server` serves from worker processes that must go down with it
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            return server, uri
        except Exception:
            time.sleep(0.5)
    stop(server)
    raise RuntimeError("the MLflow server did not start within 90 s")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, uri = start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop(process)


@pytest.fixture(scope="module")
def tracked(server: str, phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tracked")
    settings = {**tiny("unet3d"), "tracking_uri": server, "overlay_every": 1}
    train("unet3d", phantom_datalist, root / "run", epochs=2, overrides=settings, plan=False)
    checkpoint = root / "run" / "models" / "model.pt"
    evaluate("unet3d", phantom_datalist, root / "evaluation", checkpoint, "test", settings)
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("phantoms").experiment_id])
    return {"client": client, "runs": {r.data.tags["workflow"]: r for r in runs}, "root": root}


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_training_run_records_params_metrics_tags_and_artifacts(tracked: dict) -> None:
    client, run = tracked["client"], tracked["runs"]["train"]
    params = run.data.params
    expected = (
        "bundle bundle_version network parameters patch_size spacing optimizer learning_rate lr_schedule"
    )
    for key in (*expected.split(), "loss", "flip_prob", "sw_overlap", "dataset", "train_cases", "seed"):
        assert key in params, key
    for metric in (
        "train_loss",
        "lr_group_0",
        "epoch_time_s",
        "val_mean_dice",
        "val_dice_organ",
        "val_iou_core",
    ):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice_organ")] == [1, 2]
    assert (
        run.data.metrics["best_val_mean_dice"]
        >= max(m.value for m in client.get_metric_history(run.info.run_id, "val_mean_dice")) - 1e-6
    )
    assert {"bundle", "git_commit", "resumed"} <= set(run.data.tags) and run.data.tags["resumed"] == "false"
    artifacts = artifact_paths(client, run.info.run_id)
    assert "model.pt" in artifacts and "validation/per_case_last_validation.csv" in artifacts
    assert any(p.startswith("config/config_") for p in artifacts)
    assert sum(p.startswith("overlays/") and p.endswith(".png") for p in artifacts) == 4, (
        "2 cases x 2 validations"
    )


def test_no_file_path_reaches_the_server(
    tracked: dict, server: str, phantom_datalist: Path, tmp_path: Path
) -> None:
    """Every artifact (config, CSV, JSON, HTML, PNG, weights), param, tag and name of every run."""
    client, evaluation = tracked["client"], tracked["runs"]["evaluate"]
    assert {"mean_dice_raw.csv", "per_case.csv", "metrics.json", "report.html"} <= set(
        artifact_files(client, evaluation.info.run_id)
    ), "the evaluation's files are among those searched"
    paths = [str(phantom_datalist.parent.resolve()), str(tracked["root"].resolve())]
    assert leaks(server, paths, tmp_path) == []
    config = executed_config(client, evaluation.info.run_id, tmp_path / "config")
    assert config["datalist"] == "datalist.json" and config["tracking_uri"] == server
    assert config["checkpoint"] == "<redacted>"


def test_running_the_same_training_again_continues_its_run(
    tracked: dict, server: str, phantom_datalist: Path
) -> None:
    client, first = tracked["client"], tracked["runs"]["train"]
    train(
        "unet3d",
        phantom_datalist,
        tracked["root"] / "run",
        epochs=3,
        overrides={**tiny("unet3d"), "tracking_uri": server},
        plan=False,
    )
    again = client.get_run(first.info.run_id)
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val_mean_dice")] == [1, 2, 3]
    assert again.data.tags["resumed"] == "true" and again.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("phantoms").experiment_id
    assert len(client.search_runs([experiment], "tags.workflow = 'train'")) == 1


def test_evaluation_run_is_linked_to_its_training(tracked: dict) -> None:
    client, evaluation = tracked["client"], tracked["runs"]["evaluate"]
    assert evaluation.data.tags["training_run"] == tracked["runs"]["train"].info.run_name
    assert {"mean_dice", "mean_iou"} <= set(evaluation.data.metrics)
    assert {"mean_dice_raw.csv", "metrics.csv"} <= artifact_paths(client, evaluation.info.run_id)


def test_an_unreachable_server_stops_training_before_it_starts(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match="cannot be reached"):
        train(
            "unet3d",
            phantom_datalist,
            tmp_path / "run",
            epochs=1,
            overrides={**tiny("unet3d"), "tracking_uri": gone},
            plan=False,
        )
    assert not (tmp_path / "run" / "models" / "latest.pt").exists()


def test_optional_tracking_goes_on_without_a_server(phantom_datalist: Path, tmp_path: Path) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    settings = {**tiny("unet3d"), "tracking_uri": gone, "tracking_required": False}
    models = train("unet3d", phantom_datalist, tmp_path / "run", epochs=1, overrides=settings, plan=False)
    assert (models / "latest.pt").is_file()


@pytest.mark.long  # a minute: the server is stopped and its client's retries run out
def test_losing_the_server_mid_run_keeps_training_and_reports_once(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    process, uri = start_server(tmp_path / "server")
    settings = [f"{key}={value}" for key, value in {**tiny("unet3d"), "tracking_uri": uri}.items()]
    command = [sys.executable, "-m", "pipeline.cli", "train", "unet3d", "--data", str(phantom_datalist),
               "--output", str(tmp_path / "run"), "--epochs", "30", "--no-plan", *settings]  # fmt: skip
    training = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first_epoch = tmp_path / "run" / "models" / "latest.pt"  # written after epoch 1 was tracked
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and training.poll() is None and not first_epoch.exists():
        time.sleep(0.2)
    stop(process)
    log, _ = training.communicate(timeout=600)
    assert training.returncode == 0, log[-4000:]
    assert log.count("lost during the run") == 1, log[-4000:]
    import torch

    latest = torch.load(tmp_path / "run" / "models" / "latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == 30 * latest["trainer"]["epoch_length"]
