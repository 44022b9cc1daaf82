"""medseg train plans its run folder, and the checkpoints carry what inference needs of the training.

One real end-to-end training with an automatic plan on tiny data (then inference reading the saved
plan); the others train with the plan off and explicit tiny settings, as the rest of the suite does.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.compare import share_plan
from pipeline.evaluation import read_summary
from pipeline.io.checkpoint import CONFIG_KEY, load_checkpoint, network_weights, with_training_config
from pipeline.planning.auto import RUN_FINGERPRINT, patch_followers, run_folder_plan, training_config
from pipeline.planning.plan import PLAN_FILE, make_plan, write_plan
from pipeline.workflows import evaluate, infer, infer_ensemble, train
from tests.conftest import tiny
from tests.mlflow_artifacts import all_runs, leaks
from tests.test_plan import CPU, by_voxels
from tests.test_planning_rules import made_up

SHAPING = {"features": [4, 8, 16, 32, 64], "patch_size": [32, 32, 16], "spacing": [2.0, 2.0, 2.0]}


def same_space(image: Path, segmentation: Path) -> None:
    source, result = nib.load(image), nib.load(segmentation)
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)


def test_medseg_train_plans_the_run_folder_and_infer_reads_the_saved_plan(
    phantom_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlruns.db'}"
    command = ["train", "resunet", "--data", str(phantom_datalist), "--output", str(run), "--epochs", "1"]
    assert main([*command, "--minutes", "1", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "plan for resunet" in printed and "patch [" in printed and "spacing (" in printed
    plan = yaml.safe_load((run / PLAN_FILE).read_text())
    assert (run / RUN_FINGERPRINT).is_file()
    assert plan["planned"] is True and plan["time_budget_minutes"] == 1
    assert plan["patch_size"] != [96, 96, 96], "the phantoms' own size, not the bundle's default"
    saved = load_checkpoint(run / "models" / "model.pt")[CONFIG_KEY]
    assert saved == {
        key: plan[key]
        for key in ("spacing", "patch_size", "sw_batch_size", "zscore_nonzero", "channels", "strides")
    }

    (training,) = [r for r in all_runs(MlflowClient(uri)) if r.data.tags["workflow"] == "train"]
    assert training.data.params["planned"] == "True"
    assert training.data.params["patch_size"] == str(plan["patch_size"])
    assert PLAN_FILE in {a.path for a in MlflowClient(uri).list_artifacts(training.info.run_id)}
    assert leaks(uri, [str(tmp_path), str(phantom_datalist.parent)], tmp_path / "download") == []

    image = phantom_datalist.parent / "imagesTs" / "case_004.nii.gz"
    infer_command = ["infer", "resunet", "--input", str(image), "--output", str(tmp_path / "seg")]
    checkpoint = ["--checkpoint", str(run / "models" / "model.pt"), "--tracking-uri", uri]
    assert main([*infer_command, *checkpoint]) == 0, "no override typed again"
    same_space(image, tmp_path / "seg" / "case_004_seg.nii.gz")


@pytest.fixture(scope="module")
def overridden(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unet3d trained unplanned with network and preprocessing overrides, and run-control ones."""
    root = tmp_path_factory.mktemp("overridden")
    settings = {**tiny("unet3d"), **SHAPING, "learning_rate": 3e-3, "val_interval": 1}
    return train("unet3d", phantom_datalist, root / "run", 1, settings, tracking=False, plan=False)


def test_checkpoints_hold_the_overrides_that_shape_the_network_and_preprocessing(overridden: Path) -> None:
    expected = {**SHAPING, "sw_batch_size": 2}  # tiny()'s; num_workers and learning_rate only steer training
    assert load_checkpoint(overridden / "model.pt")[CONFIG_KEY] == expected
    assert load_checkpoint(overridden / "latest.pt")[CONFIG_KEY] == expected
    assert not (overridden.parent / PLAN_FILE).exists(), "plan=False plans nothing"
    assert (
        with_training_config(overridden / "model.pt", {"patch_size": [32, 32, 32]})["patch_size"] == [32] * 3
    )


def test_infer_evaluate_and_ensembles_need_no_override_typed_again(
    overridden: Path, phantom_datalist: Path, tmp_path: Path
) -> None:
    checkpoint = overridden / "model.pt"
    image = phantom_datalist.parent / "imagesTs" / "case_004.nii.gz"
    infer("unet3d", [image], tmp_path / "seg", checkpoint, tracking=False)
    same_space(image, tmp_path / "seg" / "case_004_seg.nii.gz")
    infer_ensemble(
        ["unet3d", "unet3d"],
        [checkpoint, overridden / "latest.pt"],
        [image],
        tmp_path / "ens",
        tracking=False,
    )
    same_space(image, tmp_path / "ens" / "case_004_seg.nii.gz")
    out = evaluate("unet3d", phantom_datalist, tmp_path / "eval", checkpoint, "test", tracking=False)
    assert read_summary(out)


def test_a_bare_state_dict_loads_as_before(overridden: Path, phantom_datalist: Path, tmp_path: Path) -> None:
    bare = tmp_path / "old" / "model.pt"
    bare.parent.mkdir()
    torch.save(dict(network_weights(load_checkpoint(overridden / "model.pt"))), bare)
    (bare.parent / "dataset.json").write_bytes((overridden / "dataset.json").read_bytes())
    assert with_training_config(bare, {"x": 1}) == {"x": 1}
    image = phantom_datalist.parent / "imagesTs" / "case_004.nii.gz"
    infer("unet3d", [image], tmp_path / "seg", bare, {**tiny("unet3d"), **SHAPING}, tracking=False)
    same_space(image, tmp_path / "seg" / "case_004_seg.nii.gz")


def test_the_saved_config_keeps_model_keys_and_drops_training_paths_and_tracking(tmp_path: Path) -> None:
    plan = tmp_path / PLAN_FILE
    plan.write_text(
        "planned: true\nspacing: [1.0, 1.0, 2.0]\nbatch_size: 4\nnum_workers: 1\nchannels: [8, 16]\n"
    )
    overrides = {
        "patch_size": (48, 48, 32), "network_def::dropout": 0.1, "ct_clip": None, "tracking_uri": "sqlite:///x",
        "max_epochs": 5, "learning_rate": 0.1, "rotate90_axes": [0, 2], "train::trainer::amp": False,
        "dataset_dir": tmp_path, "run_name": "r", "features": "$[4] * 5", "seed": 3,
    }  # fmt: skip
    assert training_config(plan, overrides) == {
        "spacing": [1.0, 1.0, 2.0], "channels": [8, 16], "patch_size": [48, 48, 32],
        "network_def::dropout": 0.1, "ct_clip": None,
    }  # fmt: skip
    assert training_config(None, {}) == {}


def test_a_rerun_reuses_the_run_folder_plan_and_an_unplanned_training_stays_unplanned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fp = made_up([(60, 60, 60)] * 4, [(1.0, 1.0, 1.0)] * 4)
    path = write_plan(make_plan(fp, "unet3d", CPU, step_bytes=by_voxels), run / PLAN_FILE)
    before = path.read_bytes()
    missing = tmp_path / "gone.json"  # nothing is read: planning it again would fail
    assert run_folder_plan("unet3d", missing, run) == path and path.read_bytes() == before
    assert run_folder_plan("unet3d", missing, run, enabled=False) == path, "its checkpoints need it"
    latest = tmp_path / "old" / "models" / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"a training state")
    assert run_folder_plan("unet3d", missing, latest.parent.parent, latest=latest) is None
    assert run_folder_plan("unet3d", missing, tmp_path / "new", enabled=False) is None
    assert not (tmp_path / "old" / PLAN_FILE).exists() and not (tmp_path / "new").exists()


def test_a_patch_given_over_the_plan_rotates_only_in_its_own_square_plane(tmp_path: Path) -> None:
    plan = tmp_path / PLAN_FILE
    assert patch_followers(plan, {"patch_size": [48, 64, 48]}) == {
        "rotate90_axes": [0, 2],
        "rotate90_prob": 0.2,
    }
    assert patch_followers(plan, {"patch_size": [48, 64, 32]})["rotate90_prob"] == 0.0
    assert patch_followers(plan, {"patch_size": [48, 64, 48], "rotate90_axes": [0, 1]}) == {
        "rotate90_prob": 0.2
    }
    assert patch_followers(None, {"patch_size": [48, 64, 32]}) == {}, "no plan: the bundle's defaults"


def test_compare_plans_once_per_bundle(tmp_path: Path) -> None:
    first, other = tmp_path / "unet3d" / "fold0", tmp_path / "unet3d" / "fold1"
    first.mkdir(parents=True)
    (first / PLAN_FILE).write_text("spacing: [1.0, 1.0, 1.0]\n")
    share_plan(first, other)
    assert (other / PLAN_FILE).read_text() == "spacing: [1.0, 1.0, 1.0]\n"
    (first / PLAN_FILE).write_text("spacing: [2.0, 2.0, 2.0]\n")
    share_plan(first, other)
    assert json.dumps(yaml.safe_load((other / PLAN_FILE).read_text())) == '{"spacing": [1.0, 1.0, 1.0]}'
