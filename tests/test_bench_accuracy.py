"""``make bench-accuracy``: its fixed hippocampus split, and its --quick smoke mode end to end, so the
harness cannot rot unnoticed (the real run takes hours)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.accuracy import SPLIT_FILE, arms_to_run, hippocampus_split, parse_args, split_names, write_split
from pipeline.paths import volume_bundles

ROOT = Path(__file__).resolve().parents[1]


def test_split_is_fixed_disjoint_and_points_at_the_shared_files(shared_data: Path, tmp_path: Path) -> None:
    dataset = shared_data / "msd_hippocampus" / "dataset.json"
    split = hippocampus_split(dataset, seed=0, num_test=40, num_train=None)
    names = split_names(split)
    assert split_names(hippocampus_split(dataset, seed=0, num_test=40, num_train=None)) == names
    assert split_names(hippocampus_split(dataset, seed=1, num_test=40, num_train=None)) != names
    assert (len(names["test"]), len(names["train"])) == (40, 160)
    assert not set(names["test"]) & set(names["train"])
    assert sorted(case["fold"] for case in split["training"][:5]) == [0, 1, 2, 3, 4]
    image = Path(split["test"][0]["image"])
    assert image.is_absolute() and image.is_file() and image.is_relative_to(shared_data.resolve())
    assert split["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}


def test_another_split_is_refused_while_arms_trained_on_the_first_remain(
    shared_data: Path, tmp_path: Path
) -> None:
    dataset = shared_data / "msd_hippocampus" / "dataset.json"
    path, runs = tmp_path / SPLIT_FILE, tmp_path / "runs"
    write_split(hippocampus_split(dataset, 0, 2, 4), path, runs, fresh=False)
    (runs / "unet3d" / "planned").mkdir(parents=True)
    write_split(hippocampus_split(dataset, 0, 2, 4), path, runs, fresh=False)  # the same: kept
    with pytest.raises(ValueError, match="--fresh"):
        write_split(hippocampus_split(dataset, 1, 2, 4), path, runs, fresh=False)
    write_split(hippocampus_split(dataset, 1, 2, 4), path, runs, fresh=True)
    assert not runs.exists() and split_names(json.loads(path.read_text())) == split_names(
        hippocampus_split(dataset, 1, 2, 4)
    )


def test_absent_mni_data_is_skipped_and_said(shared_data: Path, tmp_path: Path) -> None:
    args = parse_args(
        ["--bundles", "resunet", "--work", str(tmp_path), "--mni-data", str(tmp_path / "no.json")]
    )
    results: dict = {}
    arms = arms_to_run(args, tmp_path / SPLIT_FILE, results)
    assert [(arm.dataset, arm.bundle, arm.arm) for arm in arms] == [
        ("hippocampus", "resunet", "planned"),
        ("hippocampus", "resunet", "defaults"),
    ]
    assert "prepare_mni_brain.py" in results["mni_skipped"]
    assert arms[0].overrides == {}  # the command: no argument beyond --minutes


def test_bundles_named_none_run_only_the_mni_arms_with_their_levers(tmp_path: Path) -> None:
    mni = tmp_path / "datalist.json"
    argv = ["--bundles", "--mni-bundles", "unet3d", "--arms", "planned", "--levers", "no-deep-supervision"]
    args = parse_args([*argv, "--work", str(tmp_path), "--mni-data", str(mni)])
    assert args.bundles == [] and args.levers == ["no-deep-supervision"]
    assert arms_to_run(args, tmp_path / SPLIT_FILE, {}) == [], "no MNI datalist here, no hippocampus bundle"
    assert parse_args(["--work", str(tmp_path)]).bundles == volume_bundles()


@pytest.mark.long  # two real trainings and evaluations in their own processes: about 2.5 minutes
def test_quick_bench_scores_both_arms_and_resumes(shared_data: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "accuracy.json", tmp_path / "work"
    command = [sys.executable, "-m", "bench.accuracy", "--quick", "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {row["arm"]: row for row in results["rows"]}
    assert set(rows) == {"planned", "defaults"}
    for row in rows.values():
        assert set(row["dice"]) == {"Anterior", "Posterior"}
        assert all(0 <= score <= 1 for score in [*row["dice"].values(), row["dice_mean"], row["iou_mean"]])
        assert row["iterations"] > 0 and row["train_min"] > 0 and row["test_cases"] == 2
    assert rows["planned"]["settings"]["planned"] and not rows["defaults"]["settings"]["planned"]
    assert rows["planned"]["settings"]["plan"]["patch_size"] != [96, 96, 96]  # what the plan chose
    assert (len(results["split"]["train"]), len(results["split"]["test"])) == (4, 2)
    assert "| unet3d | planned |" in done.stdout and "| unet3d | defaults |" in done.stdout
    assert (work / "mlflow" / "mlruns.db").is_file()  # its own MLflow store, not the project's
    logs = {path: path.stat().st_size for path in work.rglob("train.log")}
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_size for path in work.rglob("train.log")} == logs  # nothing retrained
    assert json.loads(out.read_text())["rows"] == results["rows"]


def test_thick_slices_keep_the_extent_and_the_label_values(tmp_path: Path) -> None:
    """bench.thick_slices' 5 mm volumes: the third axis at 5 mm over the same extent, the other axes and
    the directions unchanged, and a label resampled by nearest neighbour (no new values)."""
    import SimpleITK as sitk

    from bench.thick_slices import SLICE_MM, thick

    label = np.zeros((30, 12, 10), np.uint8)  # SimpleITK's z, y, x
    label[10:20, 3:8, 2:6] = 2
    image = sitk.GetImageFromArray(label)
    image.SetSpacing((0.8, 0.9, 1.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "label.nii.gz"))
    out = sitk.ReadImage(
        thick(str(tmp_path / "label.nii.gz"), tmp_path / "thick.nii.gz", sitk.sitkNearestNeighbor)
    )
    assert out.GetSize() == (10, 12, 6) and np.allclose(out.GetSpacing(), (0.8, 0.9, SLICE_MM))
    assert np.allclose(out.GetDirection(), image.GetDirection()) and np.allclose(
        out.GetOrigin(), image.GetOrigin()
    )
    assert set(np.unique(sitk.GetArrayFromImage(out))) == {0, 2}
