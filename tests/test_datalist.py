"""Datalists: splits, paths and the errors a user sees for a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data import datalist


def write(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_cases_split_by_fold_and_resolved_against_the_datalist_folder(phantom_datalist: Path) -> None:
    train = datalist.cases(phantom_datalist, role="train", val_fold=0)
    validation = datalist.cases(phantom_datalist, role="validation", val_fold=0)
    test = datalist.cases(phantom_datalist, role="test")
    assert [c["fold"] for c in train] == [1, 1] and [c["fold"] for c in validation] == [0, 0]
    assert {c["image"] for c in train}.isdisjoint(c["image"] for c in validation)
    for case in train + validation + test:
        assert Path(case["image"]).is_file() and Path(case["label"]).is_file()
        assert Path(case["image"]).parent.parent == phantom_datalist.parent


def test_explicit_validation_list_wins_over_folds(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.json",
        {
            "labels": {"0": "background", "1": "spleen"},
            "training": [{"image": "a.nii.gz", "label": "la.nii.gz", "fold": 0}],
            "validation": [{"image": "b.nii.gz", "label": "lb.nii.gz"}],
        },
    )
    assert [Path(c["image"]).name for c in datalist.cases(path, role="train")] == ["a.nii.gz"]
    assert [Path(c["image"]).name for c in datalist.cases(path, role="validation")] == ["b.nii.gz"]


def test_entries_without_fold_get_deterministic_folds(tmp_path: Path) -> None:
    entries = [{"image": f"i{k}.nii.gz", "label": f"l{k}.nii.gz"} for k in range(10)]
    path = write(tmp_path / "d.json", {"labels": {"0": "bg", "1": "x"}, "training": entries})
    validation = datalist.cases(path, role="validation", val_fold=2, num_folds=5)
    assert [Path(c["image"]).name for c in validation] == ["i2.nii.gz", "i7.nii.gz"]


def test_header_facts_and_dataset_info_copy(phantom_datalist: Path, tmp_path: Path) -> None:
    assert datalist.label_names(phantom_datalist) == {0: "background", 1: "organ", 2: "core"}
    assert datalist.num_classes(phantom_datalist) == 3
    assert datalist.modality(phantom_datalist) == "MRI" and datalist.num_channels(phantom_datalist) == 1
    info = datalist.save_dataset_info(phantom_datalist, tmp_path / "models")
    assert "training" not in json.loads(info.read_text())
    assert datalist.label_names(info) == datalist.label_names(phantom_datalist)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ({"training": []}, "has no 'labels' table"),
        ({"labels": {"0": "bg", "2": "x"}}, "are not 0..1"),
    ],
)
def test_broken_datalists_name_the_file(tmp_path: Path, content: dict | str, message: str) -> None:
    path = write(tmp_path / "broken.json", content)
    with pytest.raises(ValueError, match=message) as error:
        datalist.label_names(path)
    assert str(path) in str(error.value)


def test_missing_datalist_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        datalist.cases(tmp_path / "nowhere.json")


def test_image_cases_expand_folders_and_refuse_missing_inputs(phantom_datalist: Path, tmp_path: Path) -> None:
    folder = phantom_datalist.parent / "imagesTr"
    found = datalist.image_cases([folder])
    assert [Path(c["image"]).name for c in found] == sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz"):
        datalist.image_cases([tmp_path / "missing.nii.gz"])
    with pytest.raises(FileNotFoundError, match=r"holds no NIfTI, PNG, TIFF or JPEG file"):
        datalist.image_cases([tmp_path])
