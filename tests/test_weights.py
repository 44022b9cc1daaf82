"""One weight loader: ``model.pt``, a training's ``latest.pt`` and a bare state dict load alike, for
``medseg infer`` and for every member of an ensemble."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import SMALL_INPUTS, TINY_NETWORKS
from model_factory import network

from pipeline.cli import main
from pipeline.data.datalist import dataset_facts
from pipeline.io.checkpoint import CheckpointError, load_network_weights, model_state, save_atomic
from pipeline.io.geometry import Grid, same_grid

TRAINED_WITH = {**TINY_NETWORKS["unet3d"], **{k: v for k, v in SMALL_INPUTS.items() if k != "num_workers"}}


def seeded_network(datalist: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return network("unet3d", datalist)


def saved_model(datalist: Path, folder: Path, seed: int) -> Path:
    """``model.pt`` as training leaves it: weights, dataset facts and the config that shaped them."""
    weights = seeded_network(datalist, seed).state_dict()
    return save_atomic(model_state(weights, dataset_facts(datalist), TRAINED_WITH), folder / "model.pt")


def saved_training_state(datalist: Path, folder: Path, seed: int) -> Path:
    """``latest.pt`` as training leaves it: the network among optimiser, trainer and random states."""
    net = seeded_network(datalist, seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    state = {
        "network": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "trainer": {"iteration": 6, "epoch_length": 3, "max_epochs": 10},
        "dataset": dataset_facts(datalist),
        "config": TRAINED_WITH,
        "best_metric": 0.5,
        "best_metric_epoch": 2,
    }
    folder.mkdir(parents=True, exist_ok=True)
    return save_atomic(state, folder / "latest.pt")


def test_every_checkpoint_form_loads_the_same_weights(phantom_datalist: Path, tmp_path: Path) -> None:
    expected = seeded_network(phantom_datalist, 3).state_dict()
    files = {
        "model.pt": saved_model(phantom_datalist, tmp_path / "a", 3),
        "latest.pt": saved_training_state(phantom_datalist, tmp_path / "b", 3),
        "bare": save_atomic(expected, tmp_path / "bare.pt"),
    }
    for form, path in files.items():
        target = seeded_network(phantom_datalist, 4)
        wrapped = torch.nn.DataParallel(target) if form == "bare" else target  # loads into its module
        assert load_network_weights(wrapped, path) is wrapped
        for key, tensor in target.state_dict().items():
            assert torch.equal(tensor, expected[key]), f"{form}: {key} not loaded"


def test_medseg_infer_ensembles_a_model_and_a_training_state(phantom_datalist: Path, tmp_path: Path) -> None:
    model = saved_model(phantom_datalist, tmp_path / "fold0", seed=1)
    latest = saved_training_state(phantom_datalist, tmp_path / "fold1", seed=2)
    image = next((phantom_datalist.parent / "imagesTs").glob("*.nii.gz"))
    out = tmp_path / "ensemble"
    command = ["infer", "unet3d", "--input", str(image), "--output", str(out), "--checkpoint", str(model),
               "--ensemble", f"unet3d={latest}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
               "num_workers=0"]  # fmt: skip
    assert main(command) == 0
    (segmentation,) = out.glob("*_seg.nii.gz")
    source, result = nib.load(image), nib.load(segmentation)
    assert same_grid(Grid(result.shape, result.affine), Grid(source.shape, source.affine))


def test_an_ensemble_member_of_another_network_is_named(
    phantom_datalist: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    model = saved_model(phantom_datalist, tmp_path / "fold0", seed=1)
    wider = {**TRAINED_WITH, "features": [8, 8, 16, 32, 64]}
    torch.manual_seed(0)
    weights = network("unet3d", phantom_datalist, **wider).state_dict()
    state = {"network": weights, "dataset": dataset_facts(phantom_datalist), "config": TRAINED_WITH}
    latest = save_atomic(state, tmp_path / "latest.pt")  # saved config says 4 features, weights have 8
    with pytest.raises(CheckpointError, match=f"checkpoint {latest} does not fit"):
        load_network_weights(seeded_network(phantom_datalist, 0), latest)
    image = next((phantom_datalist.parent / "imagesTs").glob("*.nii.gz"))
    command = ["infer", "unet3d", "--input", str(image), "--output", str(tmp_path / "out"),
               "--checkpoint", str(model), "--ensemble", f"unet3d={latest}",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]  # fmt: skip
    assert main(command) == 2
    assert f"medseg: error: checkpoint {latest} does not fit" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
