"""``medseg compare`` end to end: two tiny bundles, one epoch, TTA rows, the ensemble, MLflow nesting."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_INPUTS, TINY_NETWORKS

from pipeline.cli import main
from pipeline.compare import PARENT_TAG, STATE_FILE, compare
from pipeline.data.datalist import cases

# The race of two bundles takes minutes on 2 cores: `make test-long`; the fast compare tests below stay.
RACE = pytest.mark.long
BUNDLES = ("resunet", "attention_unet")  # both take `channels`, so one override shrinks both


@pytest.fixture(scope="module")
def raced(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    overrides = {**SMALL_INPUTS, **TINY_NETWORKS["resunet"], "tracking_uri": uri, "val_interval": 1}
    board = compare(phantom_datalist, root / "race", BUNDLES, epochs=1, overrides=overrides, plan=False)
    return {"root": root, "uri": uri, "board": board, "datalist": phantom_datalist, "overrides": overrides}


@RACE
def test_leaderboard_ranks_every_bundle_with_and_without_tta_and_the_ensemble(raced: dict) -> None:
    text = raced["board"].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    names = [row.split(" | ")[1] for row in rows]
    plain = {"resunet", "resunet + TTA", "attention_unet", "attention_unet + TTA"}
    assert set(names) - plain == {"ensemble attention_unet + resunet"} or set(names) - plain == {
        "ensemble resunet + attention_unet"
    }
    dice = [float(row.split(" | ")[2]) for row in rows]
    assert dice == sorted(dice, reverse=True), "rows are ranked by mean Dice"
    header = text.splitlines()[4]
    header_cells = [cell.strip() for cell in text.splitlines()[4].strip("|").split("|")]
    epochs = [[c.strip() for c in row.strip("|").split("|")][header_cells.index("epochs")] for row in rows]
    assert sorted(epochs) == ["-", "1", "1", "1", "1"], "one epoch each (the ensemble trains none)"
    for column in ("dice_organ", "iou_core", "hd95_organ", "parameters", "epochs", "peak memory GiB"):
        assert column in header
    assert "<table>" in raced["board"].with_suffix(".html").read_text()


@RACE
def test_mlflow_holds_a_parent_run_with_a_child_per_bundle(raced: dict) -> None:
    client = mlflow.tracking.MlflowClient(raced["uri"])
    state = json.loads((raced["board"].parent / STATE_FILE).read_text())
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts >= {"leaderboard.md", "leaderboard.html"}
    beside_the_store = (raced["root"] / "mlruns").as_uri()
    assert parent.info.artifact_uri.startswith(beside_the_store)
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(run.data.tags["bundle"] for run in children) == sorted(BUNDLES)
    for child in children:
        assert 0.0 <= child.data.metrics["heldout_dice_mean"] <= 1.0
        evaluations = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{child.info.run_id}'")
        assert sorted(run.data.params["tta"] for run in evaluations) == ["False", "True"]


@RACE
def test_the_ensemble_segmentation_is_in_the_input_space(raced: dict) -> None:
    (folder,) = raced["board"].parent.glob("ensemble_*/fold0/predictions")
    (case,) = cases(raced["datalist"], role="test")
    image = nib.load(case["image"])
    (segmentation,) = [nib.load(p) for p in folder.glob("*_seg.nii.gz")]
    assert segmentation.shape == image.shape
    assert np.allclose(segmentation.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1, 2}


@RACE
def test_a_rerun_resumes_without_training_again(raced: dict) -> None:
    race = raced["board"].parent
    models = sorted(race.glob("*/fold0/models/model.pt"))
    stamps = [p.stat().st_mtime_ns for p in models]
    arguments = [f"{key}={json.dumps(value)}" for key, value in raced["overrides"].items()]
    command = ["compare", "--data", str(raced["datalist"]), "--bundles", ",".join(BUNDLES), "--epochs", "1"]
    status = main([*command, "--no-plan", "--output", str(race), *arguments])
    assert status == 0
    assert [p.stat().st_mtime_ns for p in models] == stamps


def test_a_budget_is_required(phantom_datalist: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="budget"):
        compare(phantom_datalist, tmp_path, BUNDLES)
    assert main(["compare", "--data", str(phantom_datalist), "--bundles", "nonet", "--epochs", "1"]) == 2


def without_test_cases(datalist: Path, folder: Path) -> Path:
    """The phantom datalist with its test list dropped, case paths made absolute."""
    content = json.loads(datalist.read_text())
    del content["test"]
    for case in content["training"]:
        case.update({key: str(datalist.parent / case[key]) for key in ("image", "label")})
    path = folder / "no_test.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.long  # a real race: a minute or more on a shared CPU
def test_without_test_cases_it_scores_the_validation_fold_and_a_resume_keeps_its_settings(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    datalist = without_test_cases(phantom_datalist, tmp_path)
    overrides = {**SMALL_INPUTS, **TINY_NETWORKS["resunet"], "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}
    race = tmp_path / "race"
    board = compare(
        datalist, race, ["resunet"], epochs=1, overrides=overrides, tta=False, ensemble=False, plan=False
    )
    text = board.read_text()
    assert "scored on the validation cases of fold 0 (the datalist has no labelled test cases)" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 | resunet |"))
    assert 0.0 <= float(row.split(" | ")[2]) <= 1.0
    assert "/" not in json.loads((race / STATE_FILE).read_text())["settings"]["datalist"], (
        "a digest, not a path"
    )
    with pytest.raises(ValueError, match=r"other settings \(epochs 1\).*another --output"):
        compare(
            datalist, race, ["resunet"], epochs=2, overrides=overrides, tta=False, ensemble=False, plan=False
        )
    with pytest.raises(ValueError, match=r"other settings \(overrides\)"):
        compare(datalist, race, ["resunet"], epochs=1, overrides={**overrides, "learning_rate": 0.1})


def test_a_failing_job_is_named_and_a_failed_ensemble_is_a_row_not_a_lost_leaderboard(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    from pipeline.compare import Comparison, JobFailed, add_ensemble, run_job
    from pipeline.evaluation.leaderboard import Entry, write_leaderboard

    comparison = Comparison(phantom_datalist, tmp_path, ("resunet", "attention_unet"), epochs=1)
    with pytest.raises(JobFailed, match="compare job resunet/fold0/train exited with 1"):
        run_job(comparison, "resunet/fold0/train", "no_such_workflow")
    board = {}
    for name, dice in (("resunet", 0.8), ("attention_unet", 0.7)):
        board[name] = Entry(name)
        board[name].add_fold({"dice_mean": dice, "cases": 1.0}, None, {"seconds": 1.0, "peak_gib": 0.1})
    add_ensemble(comparison, board)  # neither was trained: no checkpoints for the ensemble's process
    assert board["ensemble resunet + attention_unet"].failure == "infer exited with 1"
    markdown, _ = write_leaderboard(list(board.values()), tmp_path, "budget")
    assert "| 3 | ensemble resunet + attention_unet |" in markdown.read_text()
