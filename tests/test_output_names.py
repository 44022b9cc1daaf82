"""One output per input: cases of one file name in different folders (the KiTS layout) never write
one file, an input given twice is refused before any work, and stray files are no inputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, phantom, tiny
from model_factory import untrained_model
from monai.bundle import ConfigParser

from pipeline.data.check import check_datalist
from pipeline.data.datalist import image_cases
from pipeline.evaluation.predictions import evaluate_predictions
from pipeline.inference.batch import cases_to_segment, label_dtype
from pipeline.io.atomic import temporary_name
from pipeline.io.readers import name_clashes, output_names
from pipeline.workflows import bundle_dir, config_files, evaluate, infer, meta_files

SETTINGS = tiny("unet3d")
SHAPES = {"p1": (20, 24, 18), "p2": (26, 20, 22)}  # different, so a swapped output shows


@pytest.fixture(scope="module")
def model(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model("unet3d", phantom_datalist, tmp_path_factory.mktemp("models"))


def write_case(
    path: Path, shape: tuple[int, int, int], seed: int, affine: np.ndarray = PHANTOM_AFFINE
) -> Path:
    image, label = phantom(shape, np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    nib.save(nib.Nifti1Image(label, affine), path.with_name(path.name.replace(".nii", "_label.nii")))
    return path


@pytest.fixture
def same_names(tmp_path: Path) -> dict[str, Path]:
    """``p1/imaging.nii.gz`` and ``p2/imaging.nii.gz``, with different shapes and origins."""
    shifted = PHANTOM_AFFINE.copy()
    shifted[:3, 3] += 7.0
    affines = {"p1": PHANTOM_AFFINE, "p2": shifted}
    return {
        case: write_case(tmp_path / "data" / case / "imaging.nii.gz", shape, index, affines[case])
        for index, (case, shape) in enumerate(SHAPES.items())
    }


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_same_file_names_in_two_folders_give_two_outputs_each_its_own_case(
    model: Path, same_names: dict[str, Path], tmp_path: Path
) -> None:
    out = infer("unet3d", list(same_names.values()), tmp_path / "out", model, SETTINGS, tracking=False)
    assert sorted(mtimes(out)) == ["p1_imaging_seg.nii.gz", "p2_imaging_seg.nii.gz"]
    for case, image in same_names.items():
        written, source = nib.load(out / f"{case}_imaging_seg.nii.gz"), nib.load(image)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine), case
    alone = infer("unet3d", [same_names["p2"]], tmp_path / "alone", model, SETTINGS, tracking=False)
    np.testing.assert_array_equal(
        nib.load(out / "p2_imaging_seg.nii.gz").get_fdata(),
        nib.load(alone / "imaging_seg.nii.gz").get_fdata(),
    )
    first = mtimes(out)
    infer("unet3d", list(same_names.values()), out, model, SETTINGS, tracking=False)
    assert mtimes(out) == first, "a rerun skips both"
    (out / "p1_imaging_seg.nii.gz").unlink()  # the rerun segments p1 alone, under its batch name
    infer("unet3d", list(same_names.values()), out, model, SETTINGS, tracking=False)
    again = mtimes(out)
    assert sorted(again) == sorted(first) and again["p2_imaging_seg.nii.gz"] == first["p2_imaging_seg.nii.gz"]
    assert nib.load(out / "p1_imaging_seg.nii.gz").shape == SHAPES["p1"]


def test_an_input_given_twice_is_refused_before_any_work(same_names: dict[str, Path], tmp_path: Path) -> None:
    image = same_names["p1"]
    twice = [image, image.parent / ".." / "p1" / image.name]
    with pytest.raises(ValueError, match="are the same input") as refused:
        infer("unet3d", twice, tmp_path / "out", tmp_path / "no_checkpoint.pt", SETTINGS, tracking=False)
    assert str(twice[1]) in str(refused.value) and not (tmp_path / "out").exists()


def test_names_are_the_shortest_distinguishing_parent_path(tmp_path: Path) -> None:
    assert output_names(["/e/a/x/CT.nii.gz", "/e/b/x/CT.nii.gz", "/e/c/y/CT.nii"]) == [
        "a_x_CT",
        "b_x_CT",
        "c_y_CT",
    ]
    assert output_names(["/e/a/case.nii.gz", "/e/b/other.nii.gz"]) == ["case", "other"], "unique: unchanged"
    _, problems = name_clashes(["/e/a/x.nii", "/e/a/x.nii.gz"])  # no folder tells them apart
    assert problems == ["/e/a/x.nii and /e/a/x.nii.gz would both be written as x: rename one"]
    _, problems = name_clashes(["/e/p1/imaging.nii.gz", "/e/p2/imaging.nii.gz", "/f/p1_imaging.nii.gz"])
    assert problems and "/f/p1_imaging.nii.gz" in problems[0]


def labelled_datalist(root: Path, images: list[Path]) -> Path:
    test = [{"image": str(p.relative_to(root)), "label": str(label_of(p).relative_to(root))} for p in images]
    datalist = {"name": "kits-like", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ",
                "2": "core"}, "training": [], "test": test}  # fmt: skip
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def label_of(image: Path) -> Path:
    return image.with_name(image.name.replace(".nii", "_label.nii"))


def test_evaluate_predictions_finds_each_case_by_its_batch_name(
    same_names: dict[str, Path], tmp_path: Path
) -> None:
    datalist = labelled_datalist(tmp_path / "data", list(same_names.values()))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for case, image in same_names.items():  # each prediction is its own case's label: Dice 1 only if matched
        label = nib.load(label_of(image))
        nib.save(label, predictions / f"{case}_imaging_seg.nii.gz")
    out = evaluate_predictions(predictions, datalist, tmp_path / "evaluation", split="test")
    lines = (out / "per_case.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert sorted(row["case"] for row in rows) == ["p1_imaging", "p2_imaging"]
    dice = [float(value) for row in rows for key, value in row.items() if key.startswith("dice")]
    assert dice and all(value == 1.0 for value in dice)


def test_evaluate_saves_each_case_under_its_own_name(
    model: Path, same_names: dict[str, Path], tmp_path: Path
) -> None:
    datalist = labelled_datalist(tmp_path / "data", list(same_names.values()))
    out = evaluate("unet3d", datalist, tmp_path / "evaluation", model, "test", SETTINGS, tracking=False)
    for case, image in same_names.items():
        assert nib.load(out / f"{case}_imaging_seg.nii.gz").shape == nib.load(image).shape, case


def test_the_data_check_reports_cases_that_would_share_an_output(tmp_path: Path) -> None:
    root = tmp_path / "data"
    one = write_case(root / "images" / "a.nii.gz", (12, 12, 12), 0)
    other = write_case(root / "images" / "a.nii", (12, 12, 12), 1)
    problems = [f.problem for f in check_datalist(labelled_datalist(root, [one, other]), roles=("test",))]
    assert any("would both be written as a" in problem for problem in problems), problems


def test_hidden_and_partial_files_are_no_inputs(tmp_path: Path) -> None:
    case = write_case(tmp_path / "in" / "case.nii.gz", (8, 8, 8), 0)
    (tmp_path / "in" / "case_label.nii.gz").unlink()
    (tmp_path / "in" / "._case.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS copy
    temporary_name(tmp_path / "in" / "other.nii.gz", keep_suffix=True).write_bytes(b"half a file")
    assert image_cases([tmp_path / "in"]) == [{"image": str(case)}]
    with pytest.raises(ValueError, match=r"\._case\.nii\.gz is a hidden file"):
        image_cases([tmp_path / "in" / "._case.nii.gz"])


def test_partial_files_of_a_killed_run_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    case = write_case(tmp_path / "in" / "case.nii.gz", (8, 8, 8), 0)
    out = tmp_path / "out"
    out.mkdir()
    killed, writing = (temporary_name(out / "case_seg.nii.gz", keep_suffix=True) for _ in range(2))
    killed.write_bytes(b"half a file")
    writing.write_bytes(b"being written")
    an_hour_ago = time.time() - 3600
    os.utime(killed, (an_hour_ago, an_hour_ago))
    unrelated = out / ".notes.txt"
    unrelated.write_text("mine")
    os.utime(unrelated, (an_hour_ago, an_hour_ago))
    assert [c["image"] for c in cases_to_segment([case], out, "seg")] == [str(case)]
    assert sorted(p.name for p in out.iterdir()) == sorted([writing.name, unrelated.name])


def test_more_than_256_classes_are_saved_as_uint16(tmp_path: Path) -> None:
    assert label_dtype(3) is np.uint8 and label_dtype(256) is np.uint8 and label_dtype(257) is np.uint16
    info = tmp_path / "dataset.json"
    info.write_text(
        json.dumps({"labels": {str(i): f"class {i}" for i in range(300)}, "modality": {"0": "CT"}})
    )
    parser = ConfigParser()
    parser.read_meta(meta_files("unet3d"))
    parser.read_config(config_files("unet3d", "inference"))
    parser.update({**SETTINGS, "bundle_root": str(bundle_dir("unet3d")), "dataset_info": str(info)})
    steps = parser["postprocessing"]["transforms"]
    (index,) = [i for i, step in enumerate(steps) if step.get("_target_") == "SaveImaged"]
    assert parser.get_parsed_content(f"postprocessing::transforms::{index}::output_dtype") is np.uint16
