"""A run folder belongs to one dataset and one training at a time, and its model.pt describes itself:
a resume with another datalist is refused before anything is overwritten, a second training into a
busy folder stops naming the holder, and a checkpoint copied elsewhere still infers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny, write_dataset

from pipeline.inference.members import load_network, member_parser
from pipeline.io.checkpoint import CheckpointError, dataset_facts, load_checkpoint, save_atomic
from pipeline.training.run_folder import lock_run_folder, release_run_folder
from pipeline.workflows import PROJECT_ROOT, require_fitting_checkpoint, train

SETTINGS = {**tiny("unet3d"), "batch_size": 1, "samples_per_volume": 1, "cache_rate": 0.0}


def relabelled(datalist: Path, out: Path, **labels: str) -> Path:
    """The same cases under other label names (the same number of classes)."""
    content = json.loads(datalist.read_text())
    content["labels"] = {**content["labels"], **labels}
    out.write_text(json.dumps(content))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One epoch on dataset A; returns (A's datalist, the run's models folder)."""
    root = tmp_path_factory.mktemp("resume")
    datalist = write_dataset(root / "A", num_cases=4)
    models = train(
        "unet3d", datalist, root / "run", 1, SETTINGS, tracking=False, check_data=False, plan=False
    )
    return datalist, models


@pytest.mark.parametrize("change", ["labels", "cases"])
def test_a_resume_with_another_dataset_is_refused_before_anything_is_overwritten(
    trained: tuple[Path, Path], tmp_path: Path, change: str
) -> None:
    datalist, models = trained
    if change == "labels":
        other, difference = relabelled(datalist, datalist.with_name("B.json"), **{"1": "liver"}), "labels"
    else:
        other, difference = write_dataset(tmp_path / "B", num_cases=5), "other training cases"
    before = {name: (models / name).read_bytes() for name in ("dataset.json", "latest.pt", "model.pt")}
    with pytest.raises(
        ValueError, match=rf"run folder {models} holds a training on another dataset .*{difference}"
    ):
        train("unet3d", other, models.parent, 2, SETTINGS, tracking=False, check_data=False, plan=False)
    assert {name: (models / name).read_bytes() for name in before} == before, "nothing overwritten"


def test_a_second_training_into_a_busy_folder_stops_naming_the_holder(tmp_path: Path) -> None:
    """This process holds the folder's lock, as a running training does; ``medseg train`` into it stops
    in one line, and leaves the holder's half-written checkpoint alone."""
    datalist = write_dataset(tmp_path / "data", num_cases=4)
    models = tmp_path / "run" / "models"
    lock_run_folder(models)
    try:
        writing = models / ".latest.pt.12345.0badcafe.tmp"
        writing.write_bytes(b"half a checkpoint")
        command = [
            sys.executable, "-m", "pipeline.cli", "train", "unet3d", "--data", str(datalist),
            "--output", str(tmp_path / "run"), "--epochs", "1", "--skip-check", "--no-plan",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
            *(f"{key}={value}" for key, value in SETTINGS.items()),
        ]  # fmt: skip
        result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert (
            f"run folder {models.resolve()} is in use by another training (pid {os.getpid()})"
            in result.stderr
        )
        assert "Traceback" not in result.stderr and writing.exists() and not (models / "latest.pt").exists()
    finally:
        release_run_folder(models)
    assert not (models / "training.lock").exists()


def test_a_model_copied_anywhere_describes_itself(trained: tuple[Path, Path], tmp_path: Path) -> None:
    datalist, models = trained
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(models / "model.pt", alone)
    assert dataset_facts(alone)["labels"] == json.loads(datalist.read_text())["labels"]
    assert require_fitting_checkpoint("unet3d", alone, tiny("unet3d")) == alone
    load_network(member_parser("unet3d", str(alone), tiny("unet3d")), str(alone), "cpu")  # an ensemble member

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(alone.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {truncated} is truncated or not a checkpoint"):
        require_fitting_checkpoint("unet3d", truncated, tiny("unet3d"))
    bare = save_atomic(dict(load_checkpoint(alone)["network"]), tmp_path / "bare" / "model.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {bare} holds no dataset facts"):
        require_fitting_checkpoint("unet3d", bare, tiny("unet3d"))
    shutil.copy(models / "dataset.json", bare.parent / "dataset.json")  # an older run's layout
    assert require_fitting_checkpoint("unet3d", bare, tiny("unet3d")) == bare
    assert set(load_checkpoint(models / "latest.pt")["dataset"]) >= {"labels", "modality", "training_cases"}
