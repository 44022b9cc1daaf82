"""Bundles as package data: each workflow's files in one folder, ``medseg config-files``, medseg's home.

Runs are real ``medseg`` processes on small phantom volumes; the files are the installed bundles'.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from conftest import tiny
from model_factory import untrained_model

from pipeline.cli import main
from pipeline.paths import COMMON_DIR, WORKFLOW_FILES, available_bundles, bundle_dir, config_files, meta_files
from pipeline.tracking.store import local_store
from pipeline.workflows import infer

LAYOUT_WARNING = "Not all config files are in"


@pytest.mark.parametrize("bundle", available_bundles())
def test_every_workflow_reads_one_folder_whose_shared_files_are_common(bundle: str) -> None:
    """MONAI warns unless every ``--config_file`` shares a folder; the shared ones stay one source."""
    configs = bundle_dir(bundle) / "configs"
    for workflow in WORKFLOW_FILES:
        files = [Path(f) for f in config_files(bundle, workflow)]
        assert {f.parent for f in files} == {configs}, workflow
        for path in files[:-1]:
            assert path.samefile(COMMON_DIR / path.name), f"{path} is not bundles/common/{path.name}"
    assert Path(meta_files(bundle)[0]).samefile(COMMON_DIR / "metadata.json")


def printed_options(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    assert main(["config-files", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = [line.split(" ", 1) for line in lines]
    assert all(len(pair) == 2 and pair[0].startswith("--") and " " not in pair[1] for pair in pairs), lines
    return {key[2:]: value for key, value in pairs}


def test_config_files_prints_what_medseg_runs(capsys: pytest.CaptureFixture[str]) -> None:
    options = printed_options(capsys, "resunet", "evaluate")
    assert ast.literal_eval(options["config_file"]) == config_files("resunet", "evaluate")
    assert ast.literal_eval(options["meta_file"]) == meta_files("resunet")
    assert Path(options["bundle_root"]) == bundle_dir("resunet")
    assert Path(options["logging_file"]).samefile(COMMON_DIR / "logging.conf")
    assert Path(options["tracking"]).samefile(COMMON_DIR / "tracking.yaml")
    assert "tracking" not in printed_options(capsys, "resunet", "train", "--no-tracking")


def test_config_files_refuses_an_unknown_bundle_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-files", "nonet", "train"]) == 2
    assert "unknown bundle 'nonet'" in capsys.readouterr().err


def test_the_mlflow_store_follows_medseg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path))
    assert local_store() == tmp_path / "mlflow" / "mlruns.db"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_medseg_run_gives_no_config_layout_warning(phantom_datalist: Path, tmp_path: Path) -> None:
    """``medseg infer``'s function on one phantom; the handler sits on MONAI's logger itself, which
    does not propagate to the root logger."""
    checkpoint = untrained_model("resunet", phantom_datalist, tmp_path / "models")
    image = next((phantom_datalist.parent / "imagesTs").glob("*.nii.gz"))
    records = Records()
    logger = logging.getLogger("monai.bundle.workflows")
    logger.addHandler(records)
    try:
        infer("resunet", [image], tmp_path / "out", checkpoint, tiny("resunet"), tracking=False)
    finally:
        logger.removeHandler(records)
    assert (tmp_path / "out" / image.name.replace(".nii.gz", "_seg.nii.gz")).is_file()
    assert any("logging properties" in message for message in records.messages), "the handler hears MONAI"
    assert not [message for message in records.messages if LAYOUT_WARNING in message]
