"""Multi-process training through torchrun on CPU (Gloo): two ranks, one record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
from conftest import tiny

from pipeline.workflows import PROJECT_ROOT


def test_two_ranks_write_one_checkpoint_and_one_run(phantom_datalist: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    settings = {**tiny("unet3d"), "tracking_uri": uri, "run_name": "ddp", "cache_rate": 0.0}
    command = [
        sys.executable, "-m", "pipeline.cli", "train", "unet3d", "--data", str(phantom_datalist),
        "--output", str(tmp_path / "run"), "--epochs", "2", "--nproc", "2", "--no-plan",
        *(f"{key}={value}" for key, value in settings.items()),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["dataset.json", "latest.pt", "model.pt"]
    assert log.count("epoch 2/2  iter 1/1  loss") == 1, "progress is logged by rank 0 only"
    assert log.count("Epoch[2] Metrics -- val_mean_dice") == 1

    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "ddp" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2, (
        "one loss per iteration, not per rank"
    )
