"""``medseg datalist``: every layout built from real files, read back by the bundles' reader, then moved."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path, PureWindowsPath

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_series
from monai.transforms import LoadImaged

from pipeline.cli import main
from pipeline.data import datalist
from pipeline.data.build import (
    assign_folds,
    build_datalist,
    relative,
    validation_cases,
)
from pipeline.io.names import case_name
from pipeline.io.readers import InputReader

SHAPE = (8, 7, 6)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def write_label(path: Path, top: int = 2) -> None:
    """A label whose values are 0..``top``, one slab per value."""
    values = np.zeros(SHAPE, np.uint8)
    for value in range(1, top + 1):
        values[value] = value
    write_nifti(path, values)


def write_pair(image: Path, label: Path | None, seed: int, top: int = 2) -> None:
    write_nifti(image, np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32))
    if label is not None:
        write_label(label, top)


def write_msd(root: Path, cases: int = 6) -> Path:
    """An MSD task folder, with the macOS ``._`` junk that some real tasks ship."""
    training = []
    for index in range(cases):
        name = f"liver_{index}.nii.gz"
        write_pair(root / "imagesTr" / name, root / "labelsTr" / name, index)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        (root / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    write_pair(root / "imagesTs" / "liver_90.nii.gz", None, 90)
    info = {
        "name": "Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": cases,
        "training": training,
        "test": ["./imagesTs/liver_90.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def write_nnunet(root: Path, cases: int = 5) -> Path:
    """nnU-Net v2 raw data with two channels per case (T2 and ADC, as in the prostate task)."""
    for index in range(cases):
        for channel in range(2):
            label = root / "labelsTr" / f"prostate_{index:03d}.nii.gz" if channel == 0 else None
            write_pair(root / "imagesTr" / f"prostate_{index:03d}_{channel:04d}.nii.gz", label, index)
    for channel in range(2):
        write_pair(root / "imagesTs" / f"prostate_900_{channel:04d}.nii.gz", None, 900)
    info = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def write_folders(root: Path, cases: int = 5) -> Path:
    """``images/`` + ``labels/``, mixed extensions; the largest label value (3) occurs in one case only."""
    for index in range(cases):
        label_name = f"case{index}.nii" if index % 2 else f"case{index}.nii.gz"
        write_pair(
            root / "images" / f"case{index}.nii.gz",
            root / "labels" / label_name,
            index,
            3 if index == 2 else 1,
        )
    (root / "images" / ".DS_Store").write_bytes(b"junk")
    return root


def write_csv(root: Path, cases: int = 5) -> Path:
    """A CSV beside ``scans/`` and ``masks/`` folders; the CSV file itself is what is passed."""
    rows = ["image,label"]
    for index in range(cases):
        write_pair(root / "scans" / f"s{index}.nii.gz", root / "masks" / f"m{index}.nii.gz", index)
        rows.append(f"scans/s{index}.nii.gz,masks/m{index}.nii.gz")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root / "cases.csv"


def write_dicom(root: Path, cases: int = 5) -> Path:
    """CT series folders with ``<case>_label.nii.gz`` beside them (the side-by-side DICOM layout)."""
    for index in range(cases):
        write_series(root / f"pt{index}", np.full(SHAPE, index, np.int16), spacing=(1.5, 1.5, 2.0))
        write_label(root / f"pt{index}_label.nii.gz")
    return root


def write_dicom_nested(root: Path, cases: int = 5) -> Path:
    """MR series under ``images/<case>/``, labels as ``labels/<case>.nii.gz``."""
    for index in range(cases):
        volume = np.full(SHAPE, index, np.int16)
        write_series(root / "images" / f"pt{index}", volume, spacing=(1.5, 1.5, 2.0), modality="MR")
        write_label(root / "labels" / f"pt{index}.nii.gz")
    return root


# layout -> (writer, labels, modality per channel, cases, test cases)
LAYOUTS = {
    "msd": (write_msd, ["background", "liver", "cancer"], ["CT"], 6, 1),
    "nnunet": (write_nnunet, ["background", "PZ", "TZ"], ["T2", "ADC"], 5, 1),
    "folders": (write_folders, ["background", "class_1", "class_2", "class_3"], ["unknown"], 5, 0),
    "csv": (write_csv, ["background", "class_1", "class_2"], ["unknown"], 5, 0),
    "dicom": (write_dicom, ["background", "class_1", "class_2"], ["CT"], 5, 0),
    "dicom_nested": (write_dicom_nested, ["background", "class_1", "class_2"], ["MRI"], 5, 0),
}


def check_read_back(path: Path, layout: str) -> None:
    """What the bundles see: label names, channels, modality, and every case's files present."""
    _, labels, modalities, count, tests = LAYOUTS[layout]
    assert list(datalist.label_names(path).values()) == labels
    assert datalist.num_channels(path) == len(modalities) and datalist.modality(path) == modalities[0]
    every = datalist.cases(path, role="all")
    assert len(every) == count and len(datalist.cases(path, role="test")) == tests
    for case in every + datalist.cases(path, role="test"):
        images = case["image"] if isinstance(case["image"], list) else [case["image"]]
        assert len(images) == len(modalities)
        assert all(Path(p).exists() for p in [*images, case.get("label", images[0])])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_detected_read_back_and_survives_moving_the_folder(
    layout: str, tmp_path: Path
) -> None:
    source = LAYOUTS[layout][0](tmp_path / "here" / "data")
    out = build_datalist(source, (source.parent if source.is_file() else source) / "datalist.json")
    text = out.read_text()
    assert str(tmp_path) not in text and '"/' not in text
    described = f"built by medseg datalist from the {layout.split('_')[0]} layout"
    assert json.loads(text)["description"].startswith(described)
    check_read_back(out, layout)
    shutil.move(tmp_path / "here", tmp_path / "there")
    moved = tmp_path / "there" / out.relative_to(tmp_path / "here")
    check_read_back(moved, layout)
    assert all(str(tmp_path / "there") in c["label"] for c in datalist.cases(moved, role="all"))


def test_output_elsewhere_gets_paths_up_and_over(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "work" / "msd" / "Task03_Liver", cases=3)
    out = build_datalist(root, tmp_path / "work" / "lists" / "liver.json", folds=3)
    entry = json.loads(out.read_text())["training"][0]
    assert entry["image"] == "../msd/Task03_Liver/imagesTr/liver_0.nii.gz"
    shutil.move(tmp_path / "work", tmp_path / "elsewhere")
    cases = datalist.cases(tmp_path / "elsewhere" / "lists" / "liver.json", role="all")
    assert len(cases) == 3 and all(Path(c["image"]).is_file() for c in cases)


def test_msd_without_a_training_list_pairs_its_folders_and_skips_macos_junk(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task03_Liver", cases=5)
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in info.items() if k != "training"}))
    out = build_datalist(root, root / "datalist.json")
    names = sorted(Path(c["image"]).name for c in datalist.cases(out, role="all"))
    assert names == [f"liver_{k}.nii.gz" for k in range(5)]


def test_multichannel_nnunet_case_loads_as_channels(tmp_path: Path) -> None:
    out = build_datalist(write_nnunet(tmp_path / "Dataset005_Prostate"), tmp_path / "datalist.json", folds=2)
    case = datalist.cases(out, role="train", num_folds=2)[0]
    loaded = LoadImaged(keys=["image", "label"], ensure_channel_first=True)(case)
    assert tuple(loaded["image"].shape) == (2, *SHAPE) and tuple(loaded["label"].shape) == (1, *SHAPE)


def test_dicom_series_folder_loads_through_the_bundles_reader(tmp_path: Path) -> None:
    out = build_datalist(write_dicom(tmp_path / "export"), tmp_path / "datalist.json")
    assert json.loads(out.read_text())["training"][0]["image"] == "export/pt0"
    case = datalist.cases(out, role="all")[3]
    loaded = LoadImaged(keys=["image", "label"], reader=InputReader, ensure_channel_first=True)(case)
    assert tuple(loaded["image"].shape) == (1, *SHAPE) == tuple(loaded["label"].shape)
    assert float(loaded["image"].max()) == 3 - 1024  # the factory's rescale intercept, applied


def test_folds_are_seeded_round_robin_and_balanced(tmp_path: Path) -> None:
    names = [f"case{k:02d}" for k in range(13)]
    folds = assign_folds(names, 5, seed=0)
    assert folds == assign_folds(list(reversed(names)), 5, seed=0)
    assert folds != assign_folds(names, 5, seed=1)
    assert sorted(Counter(folds.values()).values()) == [2, 2, 3, 3, 3]
    root = write_folders(tmp_path / "d", cases=5)
    out = build_datalist(root, root / "datalist.json", folds=2, seed=4)
    written = {case_name(Path(e["image"])): e["fold"] for e in json.loads(out.read_text())["training"]}
    assert written == assign_folds([f"case{k}" for k in range(5)], 2, seed=4)


def test_val_fraction_writes_an_explicit_validation_list(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task03_Liver", cases=6)
    out = build_datalist(root, tmp_path / "datalist.json", val_fraction=0.34, seed=3)
    content = json.loads(out.read_text())
    assert len(content["validation"]) == 2 and len(content["training"]) == 4
    assert "fold" not in content["training"][0]
    held = {Path(c["image"]).name for c in datalist.cases(out, role="validation")}
    assert held == {f"{name}.nii.gz" for name in validation_cases([f"liver_{k}" for k in range(6)], 0.34, 3)}
    with pytest.raises(ValueError, match="val-fraction"):
        build_datalist(root, tmp_path / "x.json", val_fraction=0.01)


def test_options_name_labels_and_modality_and_force_a_layout(tmp_path: Path) -> None:
    root = write_folders(tmp_path / "d", cases=3)
    (root / "images").rename(root / "ct")
    out = build_datalist(
        root,
        root / "d.json",
        layout="folders",
        labels=["bg", "a", "b", "c"],
        modality="CT",
        image_dir="ct",
        folds=3,
    )
    assert datalist.label_names(out) == {0: "bg", 1: "a", 2: "b", 3: "c"} and datalist.modality(out) == "CT"


def test_cli_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_msd(tmp_path / "Task03_Liver", cases=4)
    assert main(["datalist", str(root), "--folds", "2", "--seed", "1", "--modality", "MRI"]) == 0
    assert "4 labelled cases, 1 test" in capsys.readouterr().out
    assert datalist.modality(root / "datalist.json") == "MRI"


def test_errors_name_the_folder_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no dataset layout recognised in .*empty.*nnU-Net"):
        build_datalist(tmp_path / "empty", tmp_path / "d.json")
    root = write_folders(tmp_path / "f", cases=3)
    write_pair(root / "images" / "extra.nii.gz", root / "labels" / "stray.nii.gz", 0)
    with pytest.raises(ValueError, match="images without a label: extra; labels without an image: stray"):
        build_datalist(root, tmp_path / "d.json")
    msd = write_msd(tmp_path / "msd", cases=3)
    (msd / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelsTr/liver_1.nii.gz \(case liver_1\) does not exist"):
        build_datalist(msd, tmp_path / "d.json")
    with pytest.raises(ValueError, match="dataset's own description"):
        build_datalist(msd, msd / "dataset.json")
    nnunet = write_nnunet(tmp_path / "nn", cases=2)
    (nnunet / "imagesTr" / "prostate_001_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case prostate_001 has channels \[0\]"):
        build_datalist(nnunet, tmp_path / "d.json")


def test_dicom_errors_name_the_series_folder(tmp_path: Path) -> None:
    root = write_dicom(tmp_path / "export", cases=2)
    write_series(root / "pt9", np.zeros(SHAPE, np.int16))
    with pytest.raises(ValueError, match="images without a label: pt9; labels without an image: none"):
        build_datalist(root, tmp_path / "d.json")
    write_label(root / "pt9_label.nii.gz")
    write_series(root / "pt9", np.zeros(SHAPE, np.int16), modality="MR", rng_seed=1)
    with pytest.raises(ValueError, match=r"pt9 holds 2 DICOM series; a case folder must hold exactly one"):
        build_datalist(root, tmp_path / "d.json")


def test_paths_on_another_drive_are_refused() -> None:
    with pytest.raises(ValueError, match="not on the drive"):
        relative(PureWindowsPath("D:/data/a.nii.gz"), PureWindowsPath("C:/lists"))


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        ((0, 2_000_000_000), np.int32, r"values from 0 to 2000000000; class indices are 0 to at most 65535"),
        (
            (0, 255),
            np.uint8,
            r"case0.nii.gz holds the value 255, .* only 0, 1, 2, 3, 255: .* 256 classes, 251 of",
        ),
        ((-1, 1), np.int16, r"values from -1 to 1"),
        ((0, 1.5), np.float32, r"non-integer values"),
    ],
)
def test_a_label_file_that_holds_no_class_indices_is_refused_by_name(
    values: tuple, dtype: type, message: str, tmp_path: Path
) -> None:
    """An int32 value of 2e9 once cost a 16 GB bincount; a 0/255 mask silently made 256 classes."""
    root = write_folders(tmp_path / "f")
    label = np.zeros(SHAPE, dtype)
    label[1], label[2] = values
    write_nifti(root / "labels" / "case0.nii.gz", label)
    with pytest.raises(ValueError, match=message):
        build_datalist(root, tmp_path / "d.json")


def test_an_intensity_image_in_labels_is_refused_and_gapped_indices_are_kept(tmp_path: Path) -> None:
    root = write_folders(tmp_path / "f")
    image = np.arange(12**3, dtype=np.int16).reshape(12, 12, 12) % 1500  # an image, not a label
    write_nifti(root / "labels" / "case0.nii.gz", image)
    with pytest.raises(ValueError, match=r"case0.nii.gz holds 1500 distinct values; is it an image"):
        build_datalist(root, tmp_path / "d.json")
    brats = np.zeros(SHAPE, np.uint8)
    brats[1], brats[2], brats[3] = 1, 2, 4  # BraTS: 0, 1, 2, 4; class 3 unused is still a plausible table
    write_nifti(root / "labels" / "case0.nii.gz", brats)
    out = build_datalist(root, tmp_path / "d.json")
    assert list(datalist.label_names(out)) == [0, 1, 2, 3, 4]
