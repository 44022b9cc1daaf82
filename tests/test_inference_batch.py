"""Segmenting many cases: each output written atomically, a rerun skips finished cases, and a failing
case (unreadable, rejected by the network, unsavable) is listed at the end while the others are done."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, tiny
from model_factory import untrained_model

from pipeline.cli import main
from pipeline.inference.batch import CaseFailures, output_path
from pipeline.workflows import infer, run_workflow

SETTINGS = tiny("unet3d")


@pytest.fixture(scope="module")
def model(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model("unet3d", phantom_datalist, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def images(phantom_datalist: Path) -> list[Path]:
    return sorted((phantom_datalist.parent / "imagesTr").glob("*.nii.gz"))[:3]


def outputs(folder: Path) -> dict[str, int]:
    """Segmentations by name, with their modification times (nanoseconds)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*_seg.nii.gz") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_rerun_segments_only_what_is_missing_unless_overwrite(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    out = infer("unet3d", images[:2], tmp_path, model, SETTINGS, tracking=False)
    first = outputs(out)
    assert sorted(first) == ["case_000_seg.nii.gz", "case_001_seg.nii.gz"]
    (out / "case_000_seg.nii.gz").unlink()  # lost; case_002 is new
    infer("unet3d", images, tmp_path, model, SETTINGS, tracking=False)
    second = outputs(out)
    assert len(second) == 3 and second["case_001_seg.nii.gz"] == first["case_001_seg.nii.gz"], "not redone"
    infer("unet3d", images, tmp_path, model, SETTINGS, tracking=False, overwrite=True)
    assert all(mtime > second[name] for name, mtime in outputs(out).items()), "all redone"
    assert leftovers(out) == []
    assert output_path(images[0], out, "seg") == out / "case_000_seg.nii.gz", "SaveImaged's own naming"


def two_channels(path: Path) -> Path:
    """A readable image that the one-channel network refuses."""
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20, 2).astype(np.float32), PHANTOM_AFFINE), path)
    return path


def test_failing_cases_are_listed_and_the_others_segmented(
    model: Path,
    images: list[Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    wrong = two_channels(tmp_path / "two_channels.nii.gz")
    out = tmp_path / "out"
    (out / "case_001_seg.nii.gz").mkdir(parents=True)  # a folder where the output must go: saving fails
    status = main(
        ["infer", "unet3d", "--input", str(images[0]), str(broken), str(wrong), str(images[1]),
         "--output", str(out), "--checkpoint", str(model), "--tracking-optional",
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}", *(f"{k}={v}" for k, v in SETTINGS.items())]
    )  # fmt: skip
    err = capfd.readouterr().err
    assert status == 1 and "medseg: error: 3 of 4 cases could not be segmented" in err
    report = err[err.index("medseg: error:") :]
    for case, why in ((broken, "cannot be read"), (wrong, "channels"), (images[1], "Is a directory")):
        assert f"  {case}: " in report and why in report.split(f"  {case}: ")[1].splitlines()[0], case
    assert "Traceback" not in err
    assert list(outputs(out)) == ["case_000_seg.nii.gz"] and leftovers(out) == []


def test_the_inference_config_alone_goes_on_after_an_unreadable_case(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """``monai.bundle run`` has no pre-check: the reader fails inside the engine, on that case only."""
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(images[1].read_bytes()[:2000])
    settings = {"input": [str(truncated), str(images[0])], "output_dir": str(tmp_path / "out"),
                "checkpoint": str(model), **SETTINGS}  # fmt: skip
    with pytest.raises(CaseFailures) as failed:
        run_workflow("unet3d", "inference", settings, tracking=False)
    (failure,) = failed.value.failures
    assert failure.case == str(truncated) and "\n" not in failure.reason
    assert list(outputs(tmp_path / "out")) == ["case_000_seg.nii.gz"]


def test_disk_full_while_writing_a_prediction_keeps_the_previous_one(
    model: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = infer("unet3d", images[:1], tmp_path, model, SETTINGS, tracking=False)
    before = (out / "case_000_seg.nii.gz").read_bytes()

    def full(_: int) -> None:  # the operating system's answer when the data no longer fits
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CaseFailures) as failed:
        infer("unet3d", images[:1], tmp_path, model, SETTINGS, tracking=False, overwrite=True)
    monkeypatch.undo()
    assert (
        failed.value.failures[0].reason == f"DiskFullError: disk full while writing {out}/case_000_seg.nii.gz"
    )
    assert (out / "case_000_seg.nii.gz").read_bytes() == before and leftovers(out) == []
