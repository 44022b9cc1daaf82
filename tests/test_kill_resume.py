"""Training killed at random moments and run again: it ends with the right number of epochs, its
checkpoints load, and its MLflow run holds one continuous loss series (no gap, no repeated step).

The long test kills real training processes (``medseg train`` and ``python -m monai.bundle run``)
with SIGKILL at random points, then stops one with SIGTERM; the fast test replays in this process
the one moment a kill can leave the record ahead of the checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny, write_dataset
from mlflow.tracking import MlflowClient
from model_factory import network

from pipeline.inference.weights import LoadWeights
from pipeline.io.checkpoint import load_checkpoint
from pipeline.workflows import LOGGING_FILE, PROJECT_ROOT, TRACKING_FILE, config_files, meta_files, train

# One training case per iteration: 3 iterations per epoch on 6 cases (3 train, 3 validation).
SETTINGS = {**tiny("unet3d"), "batch_size": 1, "samples_per_volume": 1, "cache_rate": 0.0}
EPOCHS = 6
KILLS = 4
SEED = 8


def series(uri: str) -> tuple[object, dict[str, list[int]]]:
    """The one training run of the store, and the steps of its metrics."""
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    keys = ("train_loss", "lr_group_0", "epoch_time_s", "val_mean_dice", "best_val_mean_dice")
    return run, {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in keys}


def assert_one_continuous_record(uri: str, iterations: int, epochs: int) -> None:
    run, steps = series(uri)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert steps["train_loss"] == list(range(1, iterations + 1)), "each iteration exactly once"
    assert steps["lr_group_0"] == list(range(1, iterations + 1))
    for key in ("epoch_time_s", "val_mean_dice", "best_val_mean_dice"):
        assert steps[key] == list(range(1, epochs + 1)), key


def test_an_epoch_recorded_but_not_checkpointed_is_not_recorded_twice(
    phantom_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after an epoch's record was sent and before its checkpoint was written: the epoch runs
    again on resume, and its steps, already in MLflow, are not sent twice."""
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    settings = {**tiny("unet3d"), "tracking_uri": uri, "batch_size": 1}
    models = train("unet3d", phantom_datalist, tmp_path / "run", 1, settings, check_data=False, plan=False)
    shutil.copy(models / "latest.pt", tmp_path / "after_epoch_1.pt")
    train("unet3d", phantom_datalist, tmp_path / "run", 2, settings, check_data=False, plan=False)
    shutil.copy(tmp_path / "after_epoch_1.pt", models / "latest.pt")  # epoch 2 recorded, not saved
    train("unet3d", phantom_datalist, tmp_path / "run", 2, settings, check_data=False, plan=False)
    per_epoch = load_checkpoint(models / "latest.pt")["trainer"]["epoch_length"]
    assert_one_continuous_record(uri, 2 * per_epoch, 2)


class Training:
    """One training command, started again and again in the same folder, as a user would rerun it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.datalist = write_dataset(root / "data", num_cases=6)
        self.uri = f"sqlite:///{root / 'mlruns.db'}"
        self.settings = {**SETTINGS, "tracking_uri": self.uri}

    def medseg(self, epochs: int = EPOCHS) -> list[str]:
        return [
            sys.executable, "-m", "pipeline.cli", "train", "unet3d", "--data", str(self.datalist),
            "--output", str(self.root / "run"), "--epochs", str(epochs), "--skip-check", "--no-plan",
            *(f"{key}={value}" for key, value in self.settings.items()),
        ]  # fmt: skip

    def where(self) -> str:
        """The checkpoint's iteration and the last loss step MLflow holds, after a kill."""
        latest = self.root / "run" / "models" / "latest.pt"
        saved = load_checkpoint(latest)["trainer"]["iteration"] if latest.exists() else 0
        recorded = series(self.uri)[1]["train_loss"] if (self.root / "mlruns.db").exists() else []
        return f"checkpoint at iteration {saved}, MLflow up to step {max(recorded, default=0)}"

    def monai_bundle_run(self) -> list[str]:
        """What ``medseg train`` runs, as a plain ``python -m monai.bundle run`` command."""
        settings = {
            "datalist": str(self.datalist), "output_dir": str(self.root / "run"),
            "ckpt_dir": str(self.root / "run" / "models"), "max_epochs": EPOCHS, **self.settings,
        }  # fmt: skip
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--meta_file", str(meta_files("unet3d")),
            "--config_file", str(config_files("unet3d", "train")), "--logging_file", str(LOGGING_FILE),
            "--bundle_root", str(PROJECT_ROOT / "bundles" / "unet3d"), "--tracking", str(TRACKING_FILE),
        ]  # fmt: skip
        for key, value in settings.items():
            command += [f"--{key}", value if isinstance(value, str) else repr(value)]
        return command

    def run(self, command: list[str], signum: int | None = None, after: int = 0, delay: float = 0.0):
        """Run ``command``; with ``signum``, send it ``delay`` s after the ``after``-th progress line."""
        process = subprocess.Popen(
            command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines, seen, sent = [], 0, False
        for line in process.stdout:
            lines.append(line)
            seen += " iter " in line
            if signum is not None and not sent and seen > after:
                time.sleep(delay)
                process.send_signal(signum)
                sent = True
        process.wait(timeout=300)
        return process.returncode, "".join(lines)


@pytest.mark.long
def test_training_survives_random_kills(tmp_path: Path) -> None:
    training = Training(tmp_path)
    rng = random.Random(SEED)
    per_epoch = 3
    for kill in range(KILLS):
        after, delay = rng.randrange(per_epoch * 2), rng.uniform(0.0, 1.5)
        status, log = training.run(training.medseg(), signal.SIGKILL, after, delay)
        assert status == -signal.SIGKILL, f"kill {kill} came too late (after {after} lines): {log[-2000:]}"
        print(f"SIGKILL {kill + 1}: {delay:.2f} s after progress line {after + 1}; {training.where()}")
    status, log = training.run(training.monai_bundle_run(), signal.SIGTERM, after=rng.randrange(per_epoch))
    assert status == 0 and "training interrupted by SIGTERM" in log, log[-3000:]
    status, log = training.run(training.medseg())
    assert status == 0, log[-3000:]
    models = tmp_path / "run" / "models"
    latest = load_checkpoint(models / "latest.pt")
    assert latest["trainer"]["iteration"] == EPOCHS * per_epoch == EPOCHS * latest["trainer"]["epoch_length"]
    assert {"optimizer", "lr_scheduler", "rng", "best_metric"} <= set(latest)
    LoadWeights(models / "model.pt", network("unet3d", training.datalist))()
    assert_one_continuous_record(training.uri, EPOCHS * per_epoch, EPOCHS)
    assert not [p.name for p in models.iterdir() if p.name.startswith(".")], "no half-written files"


@pytest.mark.long
def test_a_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    training = Training(tmp_path)
    process = subprocess.Popen(
        training.medseg(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in process.stdout:
        if " iter " in line:
            break
    process.send_signal(signal.SIGINT)
    for line in process.stdout:  # the first one was caught: its handler has given SIGINT back
        if "SIGINT received" in line:
            break
    process.send_signal(signal.SIGINT)
    rest = process.stdout.read()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGINT, "killed by the signal itself, not a clean stop: " + rest
    assert "training interrupted by" not in rest, "no checkpoint of the stop was written"
    status, log = training.run(training.medseg(epochs=1))  # and the folder is fit to train on
    assert status == 0, log[-3000:]
    latest = load_checkpoint(tmp_path / "run" / "models" / "latest.pt")
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"]


@pytest.mark.long
def test_sigterm_to_the_process_group_checkpoints_mid_epoch_and_resumes_there(tmp_path: Path) -> None:
    """What ``timeout``, SLURM, Kubernetes and ``docker stop`` do: SIGTERM to every process of the group,
    DataLoader workers included. The workers leave it to the main process, which stops cleanly."""
    training = Training(tmp_path)
    training.settings["num_workers"] = 2
    process = subprocess.Popen(
        training.medseg(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if " iter 1/" in line:
            os.killpg(process.pid, signal.SIGTERM)
            break
    lines.append(process.stdout.read())
    process.wait(timeout=120)
    log = "".join(lines)
    assert process.returncode == 143 and "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    latest = load_checkpoint(tmp_path / "run" / "models" / "latest.pt")["trainer"]
    stopped = latest["iteration"]
    assert 0 < stopped < latest["epoch_length"], "a checkpoint of an iteration inside the first epoch"
    status, log = training.run(training.medseg(epochs=1))
    assert status == 0 and f"iteration {stopped + 1} of" in log, log[-3000:]
