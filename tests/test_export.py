"""Exporting a bundle to the model-zoo layout: the exported configs are the repository's composition,
nothing in them leads back into the repository, and the export runs as a model-zoo user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny
from monai.bundle import ConfigParser

from pipeline.cli import main
from pipeline.data.datalist import cases
from pipeline.export import (
    check_no_clash,
    check_portable,
    export_bundle,
    rewrite_commands,
)
from pipeline.export_zoo import DEFAULT_FACTS, PORTABLE, TRAINING_ONLY, to_scripts
from pipeline.io.checkpoint import CheckpointError, load_checkpoint, network_weights
from pipeline.workflows import (
    COMMON_DIR,
    LOGGING_FILE,
    PROJECT_ROOT,
    WORKFLOW_FILES,
    available_bundles,
    config_files,
    meta_files,
)

BUNDLE = "unet3d"
MERGED = [workflow for workflow in WORKFLOW_FILES if workflow != "multi_gpu_train"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(BUNDLE, tmp_path_factory.mktemp("exported"))  # an existing empty folder is fine


@pytest.fixture(scope="module")
def checkpoint(tiny_unet3d_checkpoint: Path) -> Path:
    return tiny_unet3d_checkpoint


@pytest.mark.parametrize("bundle", available_bundles())
def test_exported_configs_are_the_repository_composition(bundle: str, tmp_path: Path) -> None:
    configs = export_bundle(bundle, tmp_path / bundle) / "configs"
    expected = {f"{w}.json" for w in WORKFLOW_FILES} | {"metadata.json", "logging.conf"}
    assert {p.name for p in configs.iterdir()} == expected
    for workflow in MERGED:
        composed = ConfigParser.load_config_files(config_files(bundle, workflow))
        if workflow in PORTABLE:  # run from scripts/, dataset facts inline, inference values (export_zoo)
            training_only = {key: value for key, value in TRAINING_ONLY.items() if key in composed}
            composed = to_scripts({**composed, "dataset_info": DEFAULT_FACTS, **training_only})
        assert load(configs / f"{workflow}.json") == composed
    # Multi-GPU ships as overrides only, and `['train.json','multi_gpu_train.json']` composes as here.
    assert load(configs / "multi_gpu_train.json") == ConfigParser.load_config_file(
        COMMON_DIR / "multi_gpu_train.yaml"
    )
    pair = [configs / "train.json", configs / "multi_gpu_train.json"]
    assert ConfigParser.load_config_files(pair) == ConfigParser.load_config_files(
        config_files(bundle, "multi_gpu_train")
    )
    metadata, own = load(configs / "metadata.json"), ConfigParser.load_config_files(meta_files(bundle))
    for key in ("version", "changelog", "name", "references", "authors", "copyright"):
        assert metadata[key] == own[key], key
    assert {"version", "changelog", "network_data_format"} <= set(metadata)
    assert metadata["version"] in metadata["changelog"]
    assert (configs / "logging.conf").read_text() == LOGGING_FILE.read_text()


def test_no_exported_config_leads_back_into_the_repository(exported: Path) -> None:
    for path in (exported / "configs").glob("*.json"):
        text = path.read_text()
        assert str(PROJECT_ROOT) not in text and "bundles/common" not in text, path.name
        assert not re.search(r'"(/|[A-Za-z]:\\\\)', text), f"{path.name} holds an absolute path"
    assert load(exported / "configs" / "train.json")["bundle_root"] == "."


def test_exported_readme_commands_use_the_exported_files(exported: Path) -> None:
    docs = (exported / "docs" / "README.md").read_text()
    assert "pip install medseg-pipeline" in docs.split("\n## ")[0], "the note comes first"
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", docs, re.DOTALL))
    runs = commands.count("monai.bundle run")
    assert runs >= 4 and "bundles/" not in commands
    for workflow in MERGED:
        assert f"--config_file configs/{workflow}.json" in commands
    assert "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\"" in commands
    for option in ("--meta_file configs/metadata.json", "--logging_file configs/logging.conf"):
        assert commands.count(option) == runs
    assert commands.count("--bundle_root . ") + commands.count("--bundle_root .\n") == runs


DOCS = """Prose that mentions --bundle_root and `--config_file` keeps them.
```bash
python -m monai.bundle run --config_file "['bundles/common/base.yaml','bundles/common/inference.yaml',\
'bundles/x/configs/model.yaml']" --meta_file bundles/x/configs/metadata.json \\
    --logging_file=bundles/common/logging.conf --bundle_root bundles/x --input "['a.nii.gz']"
torchrun -m monai.bundle run --config_file='["c/base.yaml", "c/train.yaml", "c/multi_gpu_train.yaml", \
"x/model.yaml"]' --meta_file "['c/metadata.json','x/metadata.json']"
```
Inline: `python -m monai.bundle run --config_file c/base.yaml,c/train.yaml,x/model.yaml`.
"""
REWRITTEN = """Prose that mentions --bundle_root and `--config_file` keeps them.
```bash
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --logging_file=configs/logging.conf --bundle_root . --input "['a.nii.gz']"
torchrun -m monai.bundle run --config_file="['configs/train.json','configs/multi_gpu_train.json']" \
--meta_file configs/metadata.json
```
Inline: `python -m monai.bundle run --config_file configs/train.json`.
"""


def test_rewriting_understands_every_form_of_the_options() -> None:
    assert rewrite_commands(DOCS) == REWRITTEN
    assert rewrite_commands(REWRITTEN) == REWRITTEN
    with pytest.raises(ValueError, match="no workflow's file list"):
        rewrite_commands("```\nrun --config_file \"['c/base.yaml','x/model.yaml']\"\n```")


def test_a_key_set_by_model_and_overlay_is_refused() -> None:
    overrides = {"network": "$wrap(@network_def)", "train::dataloader::shuffle": False, "+validate::x": []}
    check_no_clash(overrides, {"network_def": {}, "train::inferer": {}, "patch_size": [96, 96, 96]}, "o")
    for model in (
        {"network": "@network_def"},
        {"train": {}},
        {"train#dataloader": {}},
        {"validate::x::y": 1},
    ):
        with pytest.raises(ValueError, match=r"model\.yaml and o both set"):
            check_no_clash(overrides, model, "o")


@pytest.mark.parametrize(
    "value", ["/data/models", "C:\\data", "$torch.load('/home/me/model.pt')", "bundles/common/x.yaml"]
)
def test_a_config_pointing_outside_the_export_is_refused(value: str, tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps({"ckpt_dir": "models", "x": [value]}))
    with pytest.raises(ValueError, match=r"train\.json refers outside the exported bundle"):
        check_portable(tmp_path)
    relative = {"ckpt_dir": "$@bundle_root + '/models'", "x": ["models/model.pt"], "url": "https://a.org/b"}
    (tmp_path / "train.json").write_text(json.dumps(relative))
    check_portable(tmp_path)


def test_exported_inference_runs_as_a_model_zoo_user_runs_it(
    checkpoint: Path, phantom_datalist: Path, tmp_path: Path
) -> None:
    bundle = export_bundle(BUNDLE, tmp_path / "bundle", checkpoint)
    shipped, trained = load_checkpoint(bundle / "models" / "model.pt"), load_checkpoint(checkpoint)
    weights = network_weights(trained)
    assert any(key.startswith("deep_supervision_heads.") for key in weights), "trained with deep supervision"
    assert shipped.keys() < weights.keys(), "a bare state dict, as the model zoo's, without training heads"
    assert not any("deep_supervision_heads." in key for key in shipped)
    assert all(torch.equal(shipped[key], weights[key]) for key in shipped)
    assert load(bundle / "models" / "dataset.json")["labels"]["2"] == "core"
    images = [c["image"] for c in cases(phantom_datalist, role="test")]
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--logging_file", "configs/logging.conf", "--bundle_root", ".",
        "--input", str(images), "--output_dir", str(tmp_path / "predictions"),
    ]  # fmt: skip
    for key, value in tiny(BUNDLE).items():
        command += [f"--{key}", str(value).replace(" ", "")]
    result = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for image in images:
        source = nib.load(image)
        prediction = nib.load(tmp_path / "predictions" / Path(image).name.replace(".nii.gz", "_seg.nii.gz"))
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}


def test_a_folder_with_content_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    for target in (tmp_path / "taken", tmp_path / "taken" / "mine.txt"):
        with pytest.raises(FileExistsError, match=re.escape(str(target))):
            export_bundle(BUNDLE, target)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot be read"), ({"trainer": {"epoch": 3}}, "not a")]
)
def test_an_unusable_checkpoint_is_named_and_nothing_is_written(
    content: dict | None, message: str, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.pt"
    if content is None:
        weights.write_bytes(b"not a checkpoint")
    else:
        torch.save(content, weights)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} .*{message}"):
        export_bundle(BUNDLE, tmp_path / "out", weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    command = ["export-bundle", BUNDLE, str(tmp_path / "out")]
    assert main(command) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert main(command) == 2, "a folder that is not empty is refused"
    assert capsys.readouterr().err.startswith(f"medseg: error: {tmp_path / 'out'} exists")
