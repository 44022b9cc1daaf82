"""Weights for inference tests without a training run: a bundle's network as its config builds it,
saved the way training saves it (``models/model.pt`` beside ``models/dataset.json``)."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny
from monai.bundle import ConfigParser

from pipeline.data.datalist import save_dataset_info
from pipeline.io.checkpoint import save_atomic
from pipeline.workflows import bundle_dir, config_files, meta_files


def network(bundle: str, datalist: Path, **settings: object):
    """The bundle's network for ``datalist``'s channels and classes, with the tiny test settings."""
    parser = ConfigParser()
    parser.read_meta(meta_files(bundle))
    parser.read_config(config_files(bundle, "inference"))
    parser.update(
        {**tiny(bundle), **settings, "bundle_root": str(bundle_dir(bundle)), "dataset_info": str(datalist)}
    )
    return parser.get_parsed_content("network_def")


def untrained_model(bundle: str, datalist: Path, folder: Path, **settings: object) -> Path:
    """``folder/model.pt`` (a state dict) and ``folder/dataset.json``; returns the checkpoint."""
    save_dataset_info(datalist, folder)
    return save_atomic(network(bundle, datalist, **settings).state_dict(), folder / "model.pt")
