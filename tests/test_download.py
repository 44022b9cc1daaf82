"""MSD download path, exercised offline through a file:// archive built in tmp_path."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.apps.utils import HashCheckError

from pipeline.data.download import download_msd, msd_tasks


def _fake_spleen_tar(tmp_path: Path) -> tuple[str, str]:
    """A miniature Task09_Spleen.tar: a dataset.json and one small NIfTI; returns (url, md5)."""
    src = tmp_path / "src" / "Task09_Spleen"
    (src / "imagesTr").mkdir(parents=True)
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    nib.save(image, src / "imagesTr" / "spleen_1.nii.gz")
    (src / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": []}))
    archive = tmp_path / "Task09_Spleen.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="Task09_Spleen")
    return archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_extracts_and_returns_task_dir(tmp_path: Path) -> None:
    url, md5 = _fake_spleen_tar(tmp_path)
    root = tmp_path / "msd"
    task_dir = download_msd("msd-spleen", root, url=url, md5=md5)
    assert task_dir == root / "Task09_Spleen"
    assert json.loads((task_dir / "dataset.json").read_text())["name"] == "Spleen"
    assert (task_dir / "imagesTr" / "spleen_1.nii.gz").is_file()
    assert not (root / "Task09_Spleen.tar").exists()
    # already there: no download attempted, even from a URL that does not exist
    assert download_msd("Task09_Spleen", root, url=(tmp_path / "missing.tar").as_uri()) == task_dir


def test_wrong_md5_raises_before_extracting(tmp_path: Path) -> None:
    url, _ = _fake_spleen_tar(tmp_path)
    root = tmp_path / "msd"
    with pytest.raises(HashCheckError, match="md5 hash check"):
        download_msd("msd-spleen", root, url=url, md5="0" * 32)
    assert not (root / "Task09_Spleen").exists()


def test_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="msd-hippocampus") as err:
        download_msd("msd-kidney", tmp_path)
    assert "Task04_Hippocampus" in str(err.value)


def test_friendly_names_come_from_monai_table() -> None:
    tasks = msd_tasks()
    assert tasks["msd-spleen"] == "Task09_Spleen"
    assert tasks["msd-hippocampus"] == "Task04_Hippocampus"
    assert tasks["msd-brain-tumour"] == "Task01_BrainTumour"
    assert len(set(tasks.values())) == 10
