"""The medseg command line: parsing, and the errors a user sees instead of stack traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main, parse_overrides
from pipeline.workflows import available_bundles


def test_overrides_are_typed_values() -> None:
    parsed = parse_overrides(["learning_rate=1e-4", "spacing=[1.5,1.5,2]", "amp=false", "name=abc", "a::b=3"])
    assert parsed == {"learning_rate": 1e-4, "spacing": [1.5, 1.5, 2], "amp": False, "name": "abc", "a::b": 3}
    with pytest.raises(SystemExit, match="not key=value"):
        parse_overrides(["epochs"])


def test_bundles_lists_every_bundle_with_its_parameter_count(capsys: pytest.CaptureFixture) -> None:
    assert main(["bundles"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(available_bundles())
    assert int(rows["unetr"][2].replace(",", "")) > int(rows["resunet"][2].replace(",", "")) > 1_000_000


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "unet3d", "--data", "{tmp}/missing.json"], "missing.json does not exist"),
        (["train", "nonexistent", "--data", "{datalist}"], "unknown bundle 'nonexistent'; available: "),
        (
            ["infer", "unet3d", "--input", "{tmp}/scan.nii.gz", "--output", "{tmp}/out"],
            "scan.nii.gz does not exist",
        ),
        (
            ["evaluate", "unet3d", "--data", "{datalist}", "--checkpoint", "{tmp}/nothing.pt"],
            "nothing.pt does not exist",
        ),
        (["download", "msd-nothing"], "msd-spleen"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], named: str, phantom_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [a.format(tmp=tmp_path, datalist=phantom_datalist) for a in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("medseg: error:") and named in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ([{"image": "a.nii.gz", "label": "b.nii.gz"}], "has no train cases"),
        (
            [{"image": f"i{k}.nii.gz", "label": f"l{k}.nii.gz", "fold": k} for k in range(2)],
            "i0.nii.gz: does not exist",
        ),
    ],
)
def test_unusable_datalists_are_refused_before_training(
    training: list[dict], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "training": training}))
    assert main(["train", "unet3d", "--data", str(datalist), "val_fold=0"]) == 2
    assert message in capsys.readouterr().err


def test_overlay_command_writes_a_png(phantom_datalist: Path, tmp_path: Path) -> None:
    images = phantom_datalist.parent
    out = tmp_path / "overlay.png"
    label = str(images / "labelsTr" / "case_000.nii.gz")
    assert (
        main(
            ["overlay", str(images / "imagesTr" / "case_000.nii.gz"), label, "--label", label, "-o", str(out)]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
