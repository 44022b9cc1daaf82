"""The parts of ``bench/nnunet.py`` that need no nnU-Net venv: the raw dataset it writes, the venv checks,
the torchvision guard, and the arithmetic of a bench row. (``make bench BENCH_ARGS="--quick --nnunet"``
runs the rest: venv, plan, training and timing.)"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import nnunet
from bench.run import COLUMNS, parse_args
from bench.volumes import write_datalist


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_datalist(tmp_path_factory.mktemp("volumes"), (8, 8, 4), 3)


def test_raw_dataset_is_in_nnunet_format(datalist: Path, tmp_path: Path) -> None:
    folder = nnunet.write_raw_dataset(datalist, tmp_path)
    assert folder == tmp_path / "Dataset500_BenchCT"
    images = sorted(path.name for path in (folder / "imagesTr").iterdir())
    labels = sorted(path.name for path in (folder / "labelsTr").iterdir())
    assert images == [f"train_8x8x4_{i}_0000.nii.gz" for i in range(3)]  # channel 0 of each case
    assert labels == [name.replace("_0000", "") for name in images]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}  # "CT" selects nnU-Net's CT normalisation
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"


def test_raw_dataset_is_written_once(datalist: Path, tmp_path: Path) -> None:
    folder = nnunet.write_raw_dataset(datalist, tmp_path)
    image = folder / "imagesTr" / "train_8x8x4_0_0000.nii.gz"
    image.write_bytes(b"kept")
    nnunet.write_raw_dataset(datalist, tmp_path)
    assert image.read_bytes() == b"kept"  # the cached dataset is reused, not copied again


def test_cache_layout_is_where_nnunet_looks(datalist: Path) -> None:
    home = nnunet.home_for(datalist)
    assert home == nnunet.HOME / "datalist_8x8x4_3"  # one plan and model per training datalist
    env = nnunet.environment(home)
    assert env["nnUNet_raw"] == str(home / "raw") and env["nnUNet_results"] == str(home / "results")
    parts = nnunet.checkpoint(home).relative_to(home / "results").parts
    assert parts == ("Dataset500_BenchCT", "nnUNetTrainer__nnUNetPlans__3d_fullres", "fold_0",
                     "checkpoint_final.pth")  # fmt: skip


def test_torch_goes_in_first_and_torchvision_without_dependencies() -> None:
    steps = nnunet.install_steps(Path("py"))
    assert [step[5:] for step in steps] == [
        ["torch==2.13.0"],
        ["torchvision==0.28.0", "--no-deps"],
        ["nnunetv2"],
    ]


def test_a_venv_without_the_cpu_torch_is_refused() -> None:
    listing = "Package Version\n------- -------\ntorch 2.13.0+cpu\ntorchvision 0.28.0\ntimm 1.0.22\n"
    assert nnunet.torch_versions(listing) == {"torch": "2.13.0+cpu", "torchvision": "0.28.0"}
    nnunet.check_cpu_torch(listing)
    with pytest.raises(RuntimeError, match=re.escape("has torch '2.13.0', not torch==2.13.0+cpu")):
        nnunet.check_cpu_torch(listing.replace("2.13.0+cpu", "2.13.0"))  # the CUDA build


META = '@register_meta("roi_align")\ndef meta_roi_align(x):\n    return x\n\n\n' + (
    '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(x):\n    return x\n'
)


def registrations(source: str, has_ops: bool) -> tuple[list[str], dict]:
    """Run a ``_meta_registrations.py``-like source against stand-ins for torch and torchvision."""
    registered: list[str] = []

    def register(name: str) -> Callable:
        registered.append(name)
        return lambda fn: fn

    namespace = {
        "torch": SimpleNamespace(library=SimpleNamespace(register_fake=register)),
        "torchvision": SimpleNamespace(extension=SimpleNamespace(_has_ops=lambda: has_ops)),
        "register_meta": lambda name: register(f"meta {name}") if has_ops else (lambda fn: fn),
    }
    exec(compile(source, "_meta_registrations.py", "exec"), namespace)
    return registered, namespace


def test_torchvision_fake_registrations_wait_for_its_ops() -> None:
    guarded = nnunet.guard_fake_registrations(META)
    assert guarded.splitlines()[:3] == META.splitlines()[:3]  # the guarded kind is left alone
    assert registrations(META, has_ops=False)[0] == ["torchvision::nms"]  # what fails on CPU torch
    registered, namespace = registrations(guarded, has_ops=False)
    assert registered == [] and namespace["meta_nms"](3) == 3
    assert registrations(guarded, has_ops=True)[0] == ["meta roi_align", "torchvision::nms"]


def test_row_compares_seconds_and_megavoxels() -> None:
    result = {"seconds": 10.0, "voxels": 5_000_000}
    assert nnunet.row_fields(result, 2.5) == {"nnunet_s": 10.0, "mvox_per_s_nnunet": 0.5, "vs_nnunet": 4.0}
    assert nnunet.row_fields(result, 0)["vs_nnunet"] is None
    assert "vs_nnunet" in dict(COLUMNS)


def test_summary_names_seconds_windows_and_rate() -> None:
    result = {"version": "2.8.1", "seconds": 20.0, "windows": 12, "patch_size": [24, 64, 64],
              "spacing": [2.5, 0.8, 0.8], "seconds_per_window": 1.5, "outside_network_s": 2.0,
              "voxels": 2_000_000, "peak_mem_gib": 2.3}  # fmt: skip
    line = nnunet.summary(result)
    assert "20.00 s" in line and "12 windows" in line and "0.100 Mvox/s" in line


def test_flag_works_with_quick() -> None:
    args = parse_args(["--quick", "--nnunet"])
    assert args.nnunet and args.volume == (64, 64, 24)
    assert not parse_args([]).nnunet
