"""Every bundle's composed configs resolve completely, and carry what the model zoo expects.

A typo in an id, a `_target_` or a metric name fails here, not hours into a training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny
from monai.bundle import ConfigParser, ConfigWorkflow

from pipeline.data.datalist import cases, label_names
from pipeline.paths import PLANAR_BUNDLES
from pipeline.workflows import BUNDLES_DIR, LOGGING_FILE, available_bundles, config_files, meta_files

# workflow -> (MONAI workflow type, the engine id whose resolution pulls in everything else)
WORKFLOWS = {
    "train": ("train", "train::trainer"),
    "inference": ("infer", "evaluator"),
    "evaluate": ("infer", "evaluator"),
}


def load(bundle: str, workflow: str, phantom_datalist: Path, tmp_path: Path) -> ConfigWorkflow:
    kind, _ = WORKFLOWS[workflow]
    overrides = {
        **tiny(bundle),
        "datalist": str(phantom_datalist),
        "output_dir": str(tmp_path),
        "ckpt_dir": str(tmp_path),
    }
    if workflow != "train":
        overrides["dataset_info"] = str(phantom_datalist)
        test_images = [c["image"] for c in cases(phantom_datalist, role="test")]
        overrides["input"] = test_images
    loaded = ConfigWorkflow(
        config_file=config_files(bundle, workflow),
        meta_file=meta_files(bundle),
        logging_file=str(LOGGING_FILE),
        workflow_type=kind,
        bundle_root=str(BUNDLES_DIR / bundle),
        **overrides,
    )
    loaded.initialize()
    return loaded


@pytest.mark.parametrize("bundle", available_bundles())
@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_every_id_resolves(
    bundle: str, workflow: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    planar = bundle in PLANAR_BUNDLES  # 2D images for the 2D network, 3D phantoms for the others
    datalist = request.getfixturevalue("planar_datalist" if planar else "phantom_datalist")
    loaded = load(bundle, workflow, datalist, tmp_path)
    assert loaded.check_properties() in (None, []), "MONAI's required bundle properties are all present"
    engine = loaded.parser.get_parsed_content(WORKFLOWS[workflow][1])
    assert engine.network is not None
    network = loaded.parser.get_parsed_content("network_def").eval()  # training mode stacks DS heads
    shape = tuple(tiny(bundle)["patch_size"])
    output = network(torch.zeros(1, 1, *shape))
    assert output.shape == (1, len(label_names(datalist)), *shape), "one output channel per datalist label"
    weights = [p for p in engine.network.parameters() if p.ndim == 2 + len(shape)]
    channels_last = loaded.parser.get_parsed_content("channels_last")
    assert channels_last == (bundle != "unetr"), "the layout the bench measured faster for each bundle"
    fast = torch.channels_last if planar else torch.channels_last_3d
    layout = fast if channels_last else torch.contiguous_format
    assert weights and all(p.is_contiguous(memory_format=layout) for p in weights)


@pytest.mark.parametrize("bundle", available_bundles())
def test_metadata_has_version_changelog_and_labels(bundle: str) -> None:
    metadata = ConfigParser.load_config_files(meta_files(bundle))
    assert metadata["version"] in metadata["changelog"]
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "background"
    assert (BUNDLES_DIR / bundle / "docs" / "README.md").is_file()


def test_bundle_files_hold_only_what_differs() -> None:
    """The shared workflow ids live in common/ only; a bundle's model.yaml must not redefine them."""
    shared = {
        "train",
        "validate",
        "evaluator",
        "handlers",
        "preprocessing_steps",
        "postprocessing",
        "inferer",
    }
    for bundle in available_bundles():
        model = (BUNDLES_DIR / bundle / "configs" / "model.yaml").read_text()
        top_level = {line.split(":")[0] for line in model.splitlines() if line and line[0].isalpha()}
        assert not top_level & shared, f"{bundle} copies shared workflow ids {top_level & shared}"
