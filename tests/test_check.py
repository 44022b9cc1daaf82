"""The data check on a corpus of real broken files: each gives its own finding, naming the file."""

from __future__ import annotations

import gzip
import json
import resource
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE
from dicom_factory import expected_affine, write_series

from pipeline.cli import main
from pipeline.data.check import (
    DataCheckError,
    Finding,
    check_case,
    check_datalist,
    check_image,
    require_valid,
)

LABELS = {0: "background", 1: "organ", 2: "core"}
SHAPE = (12, 10, 8)


def volume(rng_seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(rng_seed).normal(100, 10, size=shape).astype(np.float32)


def label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    data = np.zeros(shape, np.uint8)
    data[3:8, 3:7, 2:6] = 1
    data[4:6, 4:6, 3:5] = 2
    return data


def nifti(path: Path, data: np.ndarray, affine: np.ndarray = PHANTOM_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def patched(path: Path, offset: int, fmt: str, *values: float) -> Path:
    """A clean image whose header bytes at ``offset`` are overwritten, as a broken tool would write them.

    Offsets of the NIfTI-1 header: datatype 70, pixdim 76, srow_x/y/z 280/296/312.
    """
    content = bytearray(nib.Nifti1Image(volume(), np.diag([1.0, 1.0, 1.5, 1.0])).to_bytes())
    content[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(gzip.compress(bytes(content)) if path.name.endswith(".gz") else bytes(content))
    return path


def truncated_gzip(path: Path) -> Path:
    nifti(path, volume())
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def absurd_header(path: Path) -> Path:
    """A NIfTI-2 header declaring 60000^3 float32 voxels (786 TiB), followed by four bytes of data."""
    header = nib.Nifti2Header()
    header.set_data_shape((60000, 60000, 60000))
    header.set_data_dtype(np.float32)
    with gzip.open(path, "wb") as stream:
        header.write_to(stream)
        stream.write(b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr + 4))
    return path


def with_affine(path: Path, affine: np.ndarray, data: np.ndarray | None = None) -> Path:
    return nifti(path, volume() if data is None else data, affine)


def with_voxels(path: Path, value: float) -> Path:
    data = volume()
    data[1, 2, 3] = data[4, 5, 6] = value
    return nifti(path, data)


# Single-image inputs: (name, writer, expected words of the finding, severity).
BAD_IMAGES = {
    "truncated_gzip": (truncated_gzip, "truncated or corrupt (EOFError", "error"),
    "wrong_magic": (random_bytes, "cannot be read as NIfTI", "error"),
    "header_garbage": (lambda p: patched(p, 70, "<h", 999), "cannot be read as NIfTI", "error"),
    "negative_pixdim": (lambda p: patched(p, 80, "<3f", -1.0, 0.0, 1.0), "header is damaged", "error"),
    "absurd_dims": (absurd_header, "over the memory budget", "error"),
    "zero_spacing": (lambda p: patched(p, 320, "<f", 0.0), "has a zero axis", "error"),
    "nan_spacing": (lambda p: patched(p, 300, "<f", np.nan), "NaN or infinite", "error"),
    "huge_spacing": (lambda p: with_affine(p, np.diag([1.0, 1.0, 30.0, 1.0])), "over 20 mm", "error"),
    "tiny_spacing": (lambda p: with_affine(p, np.diag([1e-9, 1.0, 1.0, 1.0])), "under 0.001 mm", "error"),
    "anisotropic": (lambda p: with_affine(p, np.diag([0.5, 0.5, 12.0, 1.0])), "anisotropic", "warning"),
    "one_d": (lambda p: nifti(p, volume(shape=(12,))), "is 1D (12)", "error"),
    "single_slice": (lambda p: nifti(p, volume(shape=(12, 10, 1))), "is not an image", "error"),
    "four_d_two_volumes": (lambda p: nifti(p, volume(shape=(*SHAPE, 2))), "has 2 channels", "error"),
    "nan_voxels": (lambda p: with_voxels(p, np.nan), "2 NaN voxels", "error"),
    "infinite_voxels": (lambda p: with_voxels(p, np.inf), "2 infinite voxels", "error"),
    "blank": (lambda p: nifti(p, np.zeros(SHAPE, np.float32)), "same value", "warning"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_images")
    suffix = {"header_garbage": ".nii", "negative_pixdim": ".nii"}
    return {
        name: writer(folder / f"{name}{suffix.get(name, '.nii.gz')}")
        for name, (writer, _, _) in BAD_IMAGES.items()
    }


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_each_bad_image_gives_its_own_finding_naming_the_file(name: str, corpus: dict[str, Path]) -> None:
    _, words, severity = BAD_IMAGES[name]
    findings = check_image(corpus[name], expected_channels=1)
    assert [f for f in findings if words in f.problem and f.severity == severity], findings
    assert all(f.path == str(corpus[name]) for f in findings)
    assert str(findings[0]).startswith(f"{corpus[name]}: ")


def test_a_missing_file_is_reported_not_raised(tmp_path: Path) -> None:
    assert check_image(tmp_path / "gone.nii.gz") == [Finding(str(tmp_path / "gone.nii.gz"), "does not exist")]


def test_size_guard_refuses_from_the_header_without_allocating(corpus: dict[str, Path]) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        findings = check_image(corpus["absurd_dims"])
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "60000x60000x60000" in findings[0].problem and len(findings) == 1
    assert traced_peak < 20 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 2**10  # KiB on Linux


def test_memory_budget_is_configurable(tmp_path: Path) -> None:
    path = nifti(tmp_path / "small.nii.gz", volume())
    assert check_image(path) == []
    assert "over the memory budget of 960 bytes" in check_image(path, memory_budget=960)[0].problem


def test_clean_phantom_dataset_has_no_findings(phantom_datalist: Path) -> None:
    assert check_datalist(phantom_datalist) == []
    require_valid(phantom_datalist)


def case_files(folder: Path, image: np.ndarray | None = None, seg: np.ndarray | None = None, **kw) -> dict:
    """A case on disk: ``label_affine`` moves the label, ``seg`` replaces its voxels."""
    image_path = nifti(folder / "image.nii.gz", volume() if image is None else image)
    seg = label() if seg is None else seg
    label_path = nifti(folder / "label.nii.gz", seg, kw.get("label_affine", PHANTOM_AFFINE))
    return {"image": str(image_path), "label": str(label_path)}


def shifted(mm: float) -> np.ndarray:
    affine = PHANTOM_AFFINE.copy()
    affine[0, 3] += mm
    return affine


BAD_PAIRS = {
    "label_shape": ({"seg": label((12, 10, 7))}, "shape 12x10x7 differs from 12x10x8", "error"),
    "label_shift": ({"label_affine": shifted(0.5)}, "origin shifted by 0.5x0x0 mm", "error"),
    "undeclared_class": (
        {"seg": np.where(label() == 2, 7, label()).astype(np.uint8)},
        "values [7] are not declared classes (0 background, 1 organ, 2 core)",
        "error",
    ),
    "float_label": ({"seg": label().astype(np.float32) / 2}, "not integers (e.g. 0.5)", "error"),
    "empty_label": ({"seg": np.zeros(SHAPE, np.uint8)}, "every voxel is background", "warning"),
    "nan_label": ({"seg": np.where(label() == 2, np.nan, label())}, "NaN or infinite", "error"),
}


@pytest.mark.parametrize("name", BAD_PAIRS)
def test_each_bad_label_gives_its_own_finding_naming_the_label(name: str, tmp_path: Path) -> None:
    settings, words, severity = BAD_PAIRS[name]
    case = case_files(tmp_path, **settings)
    findings = check_case(case, LABELS, 1)
    assert [(f.path, f.severity) for f in findings] == [(case["label"], severity)], findings
    assert words in findings[0].problem


def test_geometry_within_tolerance_passes(tmp_path: Path) -> None:
    assert check_case(case_files(tmp_path, label_affine=shifted(1e-4)), LABELS, 1) == []


def test_images_of_a_case_sum_their_channels(tmp_path: Path) -> None:
    case = case_files(tmp_path)
    second = nifti(tmp_path / "t2.nii.gz", volume(1))
    assert check_case({**case, "image": [case["image"], str(second)]}, LABELS, 2) == []
    assert (
        "has 2 channels" in check_case({**case, "image": [case["image"], str(second)]}, LABELS, 1)[0].problem
    )


def test_a_2d_image_among_volumes_is_named_and_the_volumes_are_not(tmp_path: Path) -> None:
    volumes = [case_files(tmp_path / f"volume{i}") for i in range(2)]
    flat = nifti(tmp_path / "slice.nii.gz", volume(shape=(12, 10)))
    content = {
        "labels": {str(k): v for k, v in LABELS.items()},
        "training": volumes,
        "test": [{"image": str(flat)}],
    }
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    assert [(f.path, f.problem) for f in check_datalist(datalist)] == [
        (str(flat), "is 2D while 2 of the datalist's 3 images are 3D")
    ]


def mixed_datalist(root: Path, corpus: dict[str, Path]) -> Path:
    """Three good cases, and broken ones in every list, to be found in one pass."""
    good = [case_files(root / f"good{i}") for i in range(3)]
    shift = case_files(root / "shift", label_affine=shifted(2.0))
    training = [
        *good,
        {"image": str(corpus["nan_voxels"]), "label": good[0]["label"]},
        {"image": str(root / "missing.nii.gz"), "label": good[1]["label"]},
        shift,
    ]
    test = [{"image": str(corpus["truncated_gzip"])}, good[2]]
    content = {"labels": {str(k): v for k, v in LABELS.items()}, "training": training, "test": test}
    path = root / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_check_datalist_reports_every_problem_in_one_pass(tmp_path: Path, corpus: dict[str, Path]) -> None:
    datalist = mixed_datalist(tmp_path, corpus)
    findings = check_datalist(datalist)
    named = {Path(f.path).name: f.problem for f in findings}
    assert "2 NaN voxels" in named["nan_voxels.nii.gz"]
    assert named["missing.nii.gz"] == "does not exist"
    assert "origin shifted by 2x0x0 mm" in named["label.nii.gz"]
    assert "truncated or corrupt" in named["truncated_gzip.nii.gz"]
    assert "is listed 2 times (test and training)" in named["datalist.json"]
    assert len(findings) == 5 and all(f.severity == "error" for f in findings)


def test_require_valid_raises_with_a_readable_report(tmp_path: Path, corpus: dict[str, Path]) -> None:
    datalist = mixed_datalist(tmp_path, corpus)
    with pytest.raises(DataCheckError) as raised:
        require_valid(datalist, roles=("train", "validation", "test"))
    assert len(raised.value.findings) == 5 and isinstance(raised.value, ValueError)
    assert "does not exist" in str(raised.value) and "missing.nii.gz" in str(raised.value)


def test_report_is_cut_after_twenty_lines(tmp_path: Path) -> None:
    many = [
        {"image": str(tmp_path / f"m{i}.nii.gz"), "label": str(tmp_path / f"l{i}.nii.gz")} for i in range(15)
    ]
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "training": many}))
    with pytest.raises(DataCheckError) as raised:
        require_valid(datalist, roles=("all",))
    lines = str(raised.value).splitlines()
    assert len(raised.value.findings) == 30 and lines[-1] == "and 10 more" and len(lines) == 22


def test_empty_roles_and_an_unreadable_datalist(tmp_path: Path, phantom_datalist: Path) -> None:
    content = json.loads(phantom_datalist.read_text())
    content["training"] = [{**c, "fold": 1} for c in content["training"]]
    content.pop("test")
    datalist = phantom_datalist.parent / "no_validation.json"
    datalist.write_text(json.dumps(content))
    findings = {(f.problem, f.severity) for f in check_datalist(datalist)}
    assert findings == {
        ("has no validation cases (val_fold=0)", "error"),
        ("has no test cases (val_fold=0)", "warning"),
    }
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "cannot be used as a datalist" in check_datalist(broken)[0].problem


def test_cli_exits_1_with_the_report_and_0_on_clean_data(
    tmp_path: Path, corpus: dict[str, Path], phantom_datalist: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["check", str(mixed_datalist(tmp_path, corpus))]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "7 cases checked: 5 errors, 0 warnings"
    assert any(line.startswith("error: ") and line.endswith("missing.nii.gz: does not exist") for line in out)
    assert main(["check", str(phantom_datalist)]) == 0
    assert capsys.readouterr().out == "5 cases checked: 0 errors, 0 warnings\n"


def ct_volume() -> np.ndarray:
    return (np.arange(16 * 12 * 6).reshape(16, 12, 6) % 200).astype(np.int16)


def test_a_clean_dicom_series_with_a_stray_file_and_its_nifti_label_agree(tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_series(series, ct_volume(), spacing=(0.8, 0.8, 2.5))
    (series / "notes.txt").write_text("not DICOM")
    seg = np.zeros((16, 12, 6), np.uint8)
    seg[4:9, 3:8, 1:4] = 1
    label_path = nifti(tmp_path / "label.nii.gz", seg, expected_affine((0.8, 0.8, 2.5), ras=True))
    assert check_case({"image": str(series), "label": str(label_path)}, LABELS, 1) == []
    moved = nifti(tmp_path / "moved.nii.gz", seg, expected_affine((0.8, 0.8, 2.5)))  # LPS taken as RAS
    assert (
        "not on the voxel grid"
        in check_case({"image": str(series), "label": str(moved)}, LABELS, 1)[0].problem
    )


def two_series(folder: Path) -> None:
    write_series(folder, ct_volume(), series_number=3)
    write_series(folder, ct_volume(), series_number=4, rng_seed=1)


def missing_slice(folder: Path) -> None:
    write_series(folder, ct_volume(), shuffle=False)[2].unlink()


def truncated_slice(folder: Path) -> None:
    path = write_series(folder, ct_volume())[3]
    path.write_bytes(path.read_bytes()[:-100])


BAD_SERIES = {
    "two_series": (two_series, "holds 2 DICOM series"),
    "missing_slice": (missing_slice, "is a slice missing?"),
    "truncated_slice": (truncated_slice, "truncated"),
}


@pytest.mark.parametrize("name", BAD_SERIES)
def test_each_bad_dicom_series_gives_its_own_finding(name: str, tmp_path: Path) -> None:
    writer, words = BAD_SERIES[name]
    writer(tmp_path / name)
    findings = check_image(tmp_path / name)
    assert [f.path for f in findings] == [str(tmp_path / name)] and words in findings[0].problem, findings
    assert findings[0].problem.startswith("DICOM series cannot be read") and "\n" not in findings[0].problem


def test_real_ct_its_label_and_a_real_dicom_series_pass(shared_data: Path) -> None:
    folder = shared_data / "totalsegmentator_example"
    case = {"image": str(folder / "example_ct_sm.nii.gz"), "label": str(folder / "example_seg.nii.gz")}
    assert check_case(case, {index: f"class {index}" for index in range(118)}, 1) == []
    assert check_image(folder / "dicom_ct_series", expected_channels=1) == []
    spleen_only = check_case(case, {0: "background", 1: "spleen"}, 1)
    assert [f.path for f in spleen_only] == [case["label"]]
    assert "values [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] and 30 more are not" in spleen_only[0].problem
