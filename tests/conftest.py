"""Shared fixtures: small real NIfTI datasets written to disk, and the shared data folder when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.paths import PLANAR_BUNDLES

# Bundle settings that shrink inputs and networks so a CPU trains every bundle in seconds.
SMALL_INPUTS = {"patch_size": [32, 32, 32], "spacing": [2.0, 2.0, 2.0], "num_workers": 0, "sw_batch_size": 2}
TINY_NETWORKS = {
    "unet3d": {"features": [4, 8, 16, 32, 64]},
    "resunet": {"channels": [4, 8, 16, 32, 64]},
    "attention_unet": {"channels": [4, 8, 16, 32, 64]},
    "unetr": {"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
    "multiresunet": {"features": [4, 8, 16, 32, 64]},
    "unet2d": {"features": [4, 8, 16, 32, 64]},
}
PLANAR_INPUTS = {"patch_size": [32, 32], "spacing": [1.0, 1.0], "num_workers": 0, "sw_batch_size": 2}


def tiny(bundle: str) -> dict:
    inputs = PLANAR_INPUTS if bundle in PLANAR_BUNDLES else SMALL_INPUTS
    return {**inputs, **TINY_NETWORKS[bundle]}


IN_OWN_PROCESS = "MEDSEG_TEST_IN_OWN_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A test marked ``own_process`` runs in a fresh Python: one that signals its own process must not
    depend on what earlier tests left in this one (runtimes' thread pools, handlers, process groups)."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(IN_OWN_PROCESS):
        return None
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    child = subprocess.run(
        command, cwd=pyfuncitem.config.rootpath, env={**os.environ, IN_OWN_PROCESS: "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if child.returncode != 0:
        output = child.stdout[-4000:] + child.stderr[-2000:]
        pytest.fail(f"in its own process (exit status {child.returncode}):\n{output}")
    if " passed" not in child.stdout:  # it skipped there (a package missing): say so here, not "passed"
        lines = child.stdout.strip().splitlines()
        pytest.skip(f"in its own process: {next((line for line in lines if 'SKIPPED' in line), lines[-1])}")
    return True


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A non-RAS, anisotropic affine (LPS-like axes, 1.2 x 1.2 x 1.5 mm) so that any test relying on
# "same shape and affine as the input" would catch a lost flip or spacing.
PHANTOM_AFFINE = np.array(
    [[-1.2, 0.0, 0.0, 30.0], [0.0, -1.2, 0.0, 25.0], [0.0, 0.0, 1.5, -20.0], [0.0, 0.0, 0.0, 1.0]]
)


def phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An MRI-like volume: an ellipsoid 'organ' (class 1) with a brighter core (class 2), and noise."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, size=3)
    radii = np.array(shape) * rng.uniform(0.25, 0.35, size=3)
    distance = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[distance < 1.0] = 1
    label[distance < 0.5] = 2
    image = np.where(label == 1, 400.0, 0.0) + np.where(label == 2, 800.0, 0.0) + 100.0 * (distance < 1.6)
    image = image + rng.normal(0, 30, size=shape)
    return image.astype(np.float32), label


def write_dataset(root: Path, num_cases: int = 4, shape: tuple[int, int, int] = (40, 44, 36)) -> Path:
    """An MSD-style dataset of phantoms; fold = index % 2, one extra labelled test case."""
    rng = np.random.default_rng(7)
    entries = []
    for index in range(num_cases + 1):
        image, label = phantom(shape, rng)
        folder = "Ts" if index == num_cases else "Tr"
        name = f"case_{index:03d}.nii.gz"
        for kind, data in (("images", image), ("labels", label)):
            (root / f"{kind}{folder}").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, PHANTOM_AFFINE), root / f"{kind}{folder}" / name)
        entries.append(
            {"image": f"images{folder}/{name}", "label": f"labels{folder}/{name}", "fold": index % 2}
        )
    datalist = {
        "name": "phantoms",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ", "2": "core"},
        "training": entries[:-1],
        "test": [{k: v for k, v in entries[-1].items() if k != "fold"}],
    }
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def planar_phantom(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A micrograph-like 2D image (rows, columns): bright discs ("cells", mask 255) on a dark
    background with noise, as 8-bit pixels."""
    rows, columns = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    for _ in range(3):
        centre, radius = rng.uniform(8, np.array(shape) - 8), rng.uniform(4, 8)
        mask[(rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius**2] = 255
    image = np.clip(60 + 0.6 * mask + rng.normal(0, 12, size=shape), 0, 255).astype(np.uint8)
    return image, mask


def write_planar_dataset(root: Path, suffix: str = ".png", num_cases: int = 4, shape=(40, 48)) -> Path:
    """``images/`` + ``labels/`` of 2D files (masks of 0 and 255, the microscopy convention), and one
    unlabelled test image; a 16-bit TIFF for ``.tif``."""
    rng = np.random.default_rng(11)
    for kind in ("images", "labels", "test"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for index in range(num_cases + 1):
        image, mask = planar_phantom(shape, rng)
        if suffix == ".tif":
            image = image.astype(np.uint16) * 200
        folder = "test" if index == num_cases else "images"
        sitk.WriteImage(sitk.GetImageFromArray(image), str(root / folder / f"cell_{index:02d}{suffix}"))
        if index < num_cases:
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(root / "labels" / f"cell_{index:02d}{suffix}"))
    return root


@pytest.fixture(scope="session")
def planar_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planar_dataset(tmp_path_factory.mktemp("cells"))


@pytest.fixture(scope="session")
def planar_datalist(planar_dataset: Path) -> Path:
    """``medseg datalist``'s datalist of the 2D cells: two folds, ``label_values`` for the 0/255 masks."""
    from pipeline.data.build import build_datalist

    datalist = build_datalist(planar_dataset, planar_dataset / "datalist.json", folds=2)
    content = json.loads(datalist.read_text())
    content["test"] = [{"image": f"test/{p.name}"} for p in sorted((planar_dataset / "test").iterdir())]
    datalist.write_text(json.dumps(content, indent=2))
    return datalist


@pytest.fixture(scope="session")
def phantom_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA} (only present beside a project checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_unet3d_checkpoint(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the tiny unet3d on the phantoms (labels background, organ, core): weights that load,
    cheaply, for the tests that export or load a trained checkpoint."""
    from pipeline.workflows import train  # here: conftest is imported by every test, most need no bundle

    out = tmp_path_factory.mktemp("trained")
    models = train(
        "unet3d", phantom_datalist, out, epochs=1, overrides=tiny("unet3d"), tracking=False, plan=False
    )
    return models / "model.pt"
