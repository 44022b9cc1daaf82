"""Exported bundles pass the model zoo's checks (Project-MONAI/model-zoo ``ci/verify_bundle.py``),
re-created offline, and run inference with MONAI alone: in a virtual environment that sees this
environment's packages but not this project.

The clean environment is a fresh ``venv`` whose one ``.pth`` line puts this environment's
site-packages on ``sys.path``. Python processes the ``.pth`` files of a site directory only, not of
folders such a line adds, so the editable install's finder (``__editable__...pth``) never runs and
``import pipeline`` fails there, while torch, MONAI and the declared packages import as here.
"""

from __future__ import annotations

import hashlib
import json
import re
import site
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny

from pipeline.data.datalist import cases
from pipeline.export import export_bundle
from pipeline.inference.runtimes import TOLERANCE, session
from pipeline.workflows import available_bundles

BUNDLE = "unet3d"
SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
# meta_schema_20240725.json (MONAI's monai/bundle/meta_schema.json of 25 Jul 2024, PR 7409): the keys
# it requires at the top, in network_data_format, and in each tensor, and the types it gives them.
REQUIRED = {
    "schema": str,
    "version": str,
    "monai_version": str,
    "pytorch_version": str,
    "numpy_version": str,
    "required_packages_version": dict,
    "task": str,
    "description": str,
    "authors": str,
    "copyright": str,
    "network_data_format": dict,
}
OPTIONAL = {"changelog": dict, "data_source": str, "data_type": str, "image_classes": str}
OPTIONAL |= {"label_classes": str, "pred_classes": str, "eval_metrics": dict, "intended_use": str}
TENSOR = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str}
TENSOR |= {"value_range": list}


def check_metadata(metadata: dict) -> None:
    """What the schema checks: required keys with their types, the optional ones typed when present."""
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        assert key in metadata or key not in REQUIRED, f"metadata lacks required {key}"
        assert key not in metadata or isinstance(metadata[key], kind), f"{key} is not a {kind.__name__}"
    references = metadata.get("references", [])
    assert isinstance(references, list) and all(isinstance(r, str) for r in references)
    io = metadata["network_data_format"]
    assert {"inputs", "outputs"} <= set(io)
    for tensor in [*io["inputs"].values(), *io["outputs"].values()]:
        for key, kind in TENSOR.items():
            assert isinstance(tensor.get(key), kind) and not isinstance(tensor.get(key), bool), key
        assert all(isinstance(s, (int, str)) for s in tensor["spatial_shape"])
        assert all(isinstance(v, (int, float)) for v in tensor["value_range"])
        assert isinstance(tensor.get("is_patch_data", True), bool)
        assert isinstance(tensor.get("channel_def", {}), dict)
    assert metadata["version"] in metadata["changelog"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with this environment's packages and without this project (see the module docstring)."""
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    packages = next(venv.glob("lib/python*/site-packages"))
    (packages / "this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import pipeline"], cwd=venv, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pipeline'" in probe.stderr, "pipeline is importable"
    return python


@pytest.fixture(scope="module")
def checkpoint(tiny_unet3d_checkpoint: Path) -> Path:
    return tiny_unet3d_checkpoint


def zoo_files(bundle: Path) -> list[dict]:
    """The zoo's directory check: LICENSE, metadata, an inference config; large_files.yml's entries."""
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json"):
        assert (bundle / name).is_file(), f"the model zoo requires {name}"
    check_metadata(load(bundle / "configs" / "metadata.json"))
    return yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]


def test_an_export_without_weights_passes_the_zoo_checks_of_its_files(tmp_path: Path) -> None:
    bundle = export_bundle(BUNDLE, tmp_path / "bundle")
    (entry,) = zoo_files(bundle)
    assert entry["path"] == "models/model.pt" and not (bundle / "models").exists()
    assert "train with configs/train.json" in (bundle / "large_files.yml").read_text()
    metadata = load(bundle / "configs" / "metadata.json")
    assert metadata["schema"] == SCHEMA
    assert "medseg-pipeline" not in metadata["required_packages_version"]
    assert {"nibabel", "pytorch-ignite"} <= set(metadata["required_packages_version"])
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    for workflow in ("inference", "evaluate"):
        text = (bundle / "configs" / f"{workflow}.json").read_text()
        assert not re.search(r"(?<![\w-])pipeline\.", text), f"{workflow}.json still names the package"
        assert "scripts.io.readers.InputReader" in text
    assert "$import pipeline.training" in (bundle / "configs" / "train.json").read_text()
    for source in (bundle / "scripts").rglob("*.py"):
        code = source.read_text()
        assert not re.search(r"^\s*(from|import) pipeline\b", code, re.MULTILINE), source


@pytest.mark.long
@pytest.mark.parametrize("name", available_bundles())
def test_every_export_builds_its_network_from_its_folder_alone(
    name: str, clean_python: Path, tmp_path: Path
) -> None:
    """The zoo's verify_net_in_out, without weights and without this project."""
    bundle = export_bundle(name, tmp_path / name)
    zoo_files(bundle)
    check = (
        "from monai.bundle import verify_net_in_out\n"
        "verify_net_in_out(net_id='network_def', meta_file='configs/metadata.json', "
        "config_file='configs/inference.json', bundle_root='.', device='cpu')\n"
    )
    result = subprocess.run([str(clean_python), "-c", check], cwd=bundle, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


ZOO_CHECKS = """
import sys, torch
from monai.bundle import ckpt_export, run, verify_net_in_out
try:
    import pipeline
    sys.exit("pipeline is importable")
except ImportError:
    pass
common = dict(meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=".")
verify_net_in_out(net_id="network_def", device="cpu", **common)
ckpt_export(net_id="network_def", filepath="verify_model.ts", ckpt_file="models/model.pt", **common)
torch.jit.load("models/model.ts")
inputs, output_dir = sys.argv[1:-1], sys.argv[-1]
run(run_id="run", logging_file="configs/logging.conf", input=inputs, output_dir=output_dir, **common)
"""


@pytest.mark.long
def test_a_trained_export_runs_with_monai_alone(
    checkpoint: Path, phantom_datalist: Path, clean_python: Path, tmp_path: Path
) -> None:
    bundle = export_bundle(BUNDLE, tmp_path / "bundle", checkpoint)
    entries = {entry["path"]: entry for entry in zoo_files(bundle)}
    assert set(entries) == {"models/model.pt", "models/model.ts", "models/model.onnx"}
    assert entries["models/model.pt"]["hash_val"] == md5(bundle / "models" / "model.pt")
    metadata = load(bundle / "configs" / "metadata.json")
    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "organ", "2": "core"}
    assert (image["num_channels"], image["modality"], pred["num_channels"]) == (1, "MR", 3)
    assert image["spatial_shape"] == tiny(BUNDLE)["patch_size"], "the patch the weights were trained on"
    assert "organ, core" in metadata["task"]
    # No overrides: the configs build the trained (tiny) network by themselves.
    images = [c["image"] for c in cases(phantom_datalist, role="test")]
    command = [str(clean_python), "-c", ZOO_CHECKS, *images, str(tmp_path / "predictions")]
    result = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    patch = torch.rand(1, 1, *image["spatial_shape"])
    assert scripted(patch).shape == (1, 3, *image["spatial_shape"])
    onnx_run = session("onnxruntime", bundle / "models" / "model.onnx")
    found = torch.softmax(torch.from_numpy(onnx_run(patch.numpy())), 1)
    assert float((found - torch.softmax(scripted(patch), 1)).abs().max()) <= TOLERANCE
    for path in images:
        source = nib.load(path)
        prediction = nib.load(tmp_path / "predictions" / Path(path).name.replace(".nii.gz", "_seg.nii.gz"))
        assert prediction.shape == source.shape
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}
