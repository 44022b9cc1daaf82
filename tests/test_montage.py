"""Montages of several real NIfTI cases: tile count, titles with Dice, the slice each tile shows."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from pipeline.cli import main
from pipeline.visualisation import MontageCase, save_montage
from pipeline.visualisation.montage import (
    TRUTH_COLOUR,
    datalist_montage_cases,
    montage_canvas,
    parse_case,
)
from pipeline.visualisation.panels import class_colour

SHAPE = (32, 28, 16)
AFFINE = np.diag([-1.2, 1.2, 2.5, 1.0])  # x flipped, anisotropic


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def _truth() -> np.ndarray:
    """Class 1: a small box low down (z 2-3); class 2: a larger one high up (z 10-13)."""
    truth = np.zeros(SHAPE, np.uint8)
    truth[4:8, 4:8, 2:4] = 1
    truth[10:24, 8:20, 10:14] = 2
    return truth


@pytest.fixture
def cases(tmp_path: Path) -> list[MontageCase]:
    """Five cases whose prediction is the truth shifted by 0..4 voxels along x."""
    made = []
    for index in range(5):
        image = np.random.default_rng(index).normal(200, 20, SHAPE).astype(np.float32)
        truth = _truth()
        pred = np.roll(truth, index, axis=0)
        name = f"case{index}"
        paths = [_save(tmp_path / f"{name}_{kind}.nii.gz", data) for kind, data in
                 (("image", image), ("truth", truth), ("pred", pred))]  # fmt: skip
        made.append(MontageCase(name, paths[0], paths[2], paths[1]))
    return made


def _monai_mean_dice(case: MontageCase) -> float:
    pred, truth = (
        torch.as_tensor(np.asarray(nib.load(p).dataobj))[None, None] for p in (case.seg, case.label)
    )
    return float(compute_dice(one_hot(pred, 3), one_hot(truth, 3), include_background=False).mean())


def test_one_tile_per_case_titled_with_name_and_dice(cases: list[MontageCase], tmp_path: Path) -> None:
    canvas = montage_canvas(cases, columns=3, label_names={1: "small", 2: "large"}, title="fold 0")
    assert len(canvas.panels) == 5
    assert len({left for left, *_ in canvas.panels}) == 3 and len({top for _, top, *_ in canvas.panels}) == 2
    texts = [t.get_text() for t in canvas.figure.texts]
    scores = [_monai_mean_dice(case) for case in cases]
    assert scores[0] == 1.0 and scores[4] < scores[1] < 1.0  # the shift is felt
    for case, score in zip(cases, scores, strict=True):
        assert f"{case.name} · Dice {score:.3f}" in texts
    assert f"fold 0 — mean Dice {np.mean(scores):.3f} over 5 cases" in texts
    assert [t.get_text() for t in canvas.figure.legends[0].get_texts()] == [
        "small",
        "large",
        "ground truth (outline)",
    ]

    png = mpimg.imread(save_montage(cases, tmp_path / "m.png", columns=3))
    assert png.shape[:2] == (canvas.height, canvas.width)


def test_tile_shows_the_axial_slice_through_the_largest_structure(
    cases: list[MontageCase], tmp_path: Path
) -> None:
    png = mpimg.imread(save_montage(cases[:2], tmp_path / "m.png"))[..., :3]
    canvas = montage_canvas(cases[:2])
    for left, top, width, height in canvas.panels:
        tile = png[top : top + height, left : left + width]

        def has(colour: tuple[float, float, float], tile: np.ndarray = tile) -> bool:
            return bool((np.abs(tile - np.asarray(colour)) < 1.5 / 255).all(axis=-1).any())

        assert has(class_colour(2)) and not has(class_colour(1))  # z 10-13 shown, not z 2-3
        assert has(TRUTH_COLOUR)  # the truth's outline


def test_cases_from_a_datalist_and_its_predictions(phantom_datalist: Path, tmp_path: Path) -> None:
    labels = phantom_datalist.parent / "labelsTr"
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    shutil.copy(labels / "case_000.nii.gz", predictions / "case_000_seg.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"case_002_seg\.nii\.gz"):
        datalist_montage_cases(phantom_datalist, predictions, "validation")
    shutil.copy(labels / "case_002.nii.gz", predictions / "case_002_seg.nii.gz")
    found = datalist_montage_cases(phantom_datalist, predictions, "validation")
    assert [(c.name, Path(c.seg).name, Path(c.label).name) for c in found] == [
        ("case_000", "case_000_seg.nii.gz", "case_000.nii.gz"),
        ("case_002", "case_002_seg.nii.gz", "case_002.nii.gz"),
    ]

    out = tmp_path / "montage.png"
    args = [
        "montage",
        "--data",
        str(phantom_datalist),
        "--predictions",
        str(predictions),
        "--split",
        "validation",
    ]
    assert main([*args, "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_cases_on_the_command_line(
    cases: list[MontageCase], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli.png"
    triples = [f"{c.image}:{c.seg}:{c.label}" for c in cases[:2]] + [f"{cases[2].image}:{cases[2].seg}"]
    assert main(["montage", *triples, "--columns", "2", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert parse_case("a.nii.gz:b.nii.gz") == MontageCase("a", "a.nii.gz", "b.nii.gz", None)
    for bad in ("only.nii.gz", "a:b:c:d", "a::c"):
        with pytest.raises(ValueError, match="IMAGE:SEG"):
            parse_case(bad)
    assert main(["montage", "-o", str(out)]) == 2
    assert "give either" in capsys.readouterr().err
    assert main(["montage", triples[0], "--columns", "0", "-o", str(out)]) == 2
    assert "columns" in capsys.readouterr().err
