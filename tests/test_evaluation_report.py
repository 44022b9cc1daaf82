"""``medseg evaluate --predictions`` end to end on phantom NIfTI files: tables, JSON and the HTML page."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dataset

from pipeline.cli import main
from pipeline.data.datalist import cases
from pipeline.evaluation import evaluate_predictions
from pipeline.evaluation.html_report import ranked_cases
from pipeline.evaluation.metrics import ClassScores
from pipeline.evaluation.report import CaseResult
from pipeline.io.names import case_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """The page's images and table cells, which is what a reader would see."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.tags: set[str] = set()
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        self._in_cell = tag == "td"

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data)
            self._in_cell = False


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("phantoms"), num_cases=6, shape=(28, 30, 24))


def write_predictions(datalist: Path, folder: Path, split: str = "validation") -> list[str]:
    """The labels themselves, except that the first case loses its core and gains a 1-voxel island."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, case in enumerate(cases(datalist, role=split)):
        label = nib.load(case["label"])
        data = np.asarray(label.dataobj).copy()
        if index == 0:
            data[data == 2] = 1
            data[0, 0, 0] = 2
        name = case_name(Path(case["image"]))
        nib.save(nib.Nifti1Image(data.astype(np.uint8), label.affine), folder / f"{name}_seg.nii.gz")
        names.append(name)
    return sorted(names)


def test_scores_predictions_on_disk(dataset: Path, tmp_path: Path) -> None:
    names = write_predictions(dataset, tmp_path / "predictions")
    out = evaluate_predictions(tmp_path / "predictions", dataset, tmp_path / "evaluation", split="validation")
    with (out / "per_case.csv").open() as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == names
    worst, *perfect = (rows[name] for name in names)
    assert float(worst["dice_core"]) == 0.0 and float(worst["hd95_core"]) > 0.0
    assert float(worst["pred_ml_core"]) == pytest.approx(1.2 * 1.2 * 1.5 / 1000)
    for row in perfect:
        assert (
            float(row["dice_mean"]) == 1.0
            and float(row["hd95_mean"]) == 0.0
            and float(row["asd_organ"]) == 0.0
        )
        assert float(row["pred_ml_organ"]) == float(row["gt_ml_organ"]) > 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["primary"] == "predictions" and summary["postprocessing"] is None
    stats = summary["variants"]["predictions"]["summary"]["core"]["dice"]
    assert stats["mean"] == pytest.approx((len(names) - 1) / len(names)) and stats["median"] == 1.0
    assert len(summary["variants"]["predictions"]["cases"]) == len(names)


def test_the_report_is_one_self_contained_page(dataset: Path, tmp_path: Path) -> None:
    names = write_predictions(dataset, tmp_path / "predictions")
    evaluate_predictions(tmp_path / "predictions", dataset, tmp_path / "evaluation", split="validation")
    page = PageParser()
    page.feed((tmp_path / "evaluation" / "report.html").read_text())
    assert not page.tags & {"script", "link", "iframe"}
    # the box plots, then the best, median and worst cases (three distinct cases here)
    assert len(page.images) == 1 + 3
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert all(name in page.cells for name in names)


def test_medseg_evaluate_predictions(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_predictions(dataset, tmp_path / "predictions", split="test")
    status = main(
        [
            "evaluate",
            "--predictions",
            str(tmp_path / "predictions"),
            "--data",
            str(dataset),
            "--split",
            "test",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert (tmp_path / "evaluation_test" / "report.html").is_file()
    assert "core" in printed and "HD95 mm" in printed and str(tmp_path / "evaluation_test") in printed


def test_missing_or_mismatched_predictions_are_named(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    names = write_predictions(dataset, tmp_path / "predictions")
    (tmp_path / "predictions" / f"{names[0]}_seg.nii.gz").unlink()
    arguments = ["evaluate", "--predictions", str(tmp_path / "predictions"), "--data", str(dataset)]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 2
    assert f"medseg: error: {tmp_path / 'predictions'} lacks 1 of" in capsys.readouterr().err

    image = nib.load(next(iter(cases(dataset, role="validation")))["label"])
    cropped = nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), image.affine)
    nib.save(cropped, tmp_path / "predictions" / f"{names[0]}_seg.nii.gz")
    with pytest.raises(
        ValueError, match=f"{names[0]}_seg.nii.gz is not on the voxel grid.*shape 5x5x5 differs"
    ):
        evaluate_predictions(tmp_path / "predictions", dataset, tmp_path / "out", split="validation")

    moved = image.affine.copy()
    moved[:3, 3] += 0.5  # half a millimetre: a misregistration, not round-off
    nib.save(
        nib.Nifti1Image(np.asanyarray(image.dataobj), moved),
        tmp_path / "predictions" / f"{names[0]}_seg.nii.gz",
    )
    with pytest.raises(ValueError, match=r"origin shifted by 0\.5x0\.5x0\.5 mm"):
        evaluate_predictions(tmp_path / "predictions", dataset, tmp_path / "out", split="validation")


def test_predictions_and_a_bundle_are_exclusive(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "predictions"
    shutil.rmtree(folder, ignore_errors=True)
    write_predictions(dataset, folder)
    assert main(["evaluate", "unet3d", "--predictions", str(folder), "--data", str(dataset)]) == 2
    assert "no bundle" in capsys.readouterr().err
    assert main(["evaluate", "--predictions", str(folder), "--data", str(dataset), "learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(dataset)]) == 2
    assert "--predictions" in capsys.readouterr().err


def test_best_median_and_worst_cases_are_distinct() -> None:
    def result(name: str, dice: float) -> CaseResult:
        return CaseResult(name, {"predictions": {1: ClassScores(dice, dice, 0.0, 0.0, 1.0, 1.0)}})

    results = [result(f"c{i}", dice) for i, dice in enumerate([0.5, 0.9, 0.1, 0.7])]
    ranked = [(rank, r.case) for rank, r in ranked_cases(results, "predictions")]
    assert ranked == [("best", "c1"), ("median", "c0"), ("worst", "c2")]
    assert [rank for rank, _ in ranked_cases(results[:2], "predictions")] == ["best", "worst"]
    assert [rank for rank, _ in ranked_cases(results[:1], "predictions")] == ["best"]
