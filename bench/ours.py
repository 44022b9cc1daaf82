"""Our side: a bundle's inference and training configs exactly as users run them.

Inference parses ``config_files(bundle, "inference")`` (what ``medseg infer`` and ``monai.bundle run``
compose) and runs its evaluator; only the network is wrapped, to time and sample its windows.
Training takes the train config's own data loader, network, optimizer and the trainer's loss.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import set_determinism

from bench.sampling import SampledNetwork
from pipeline.bundle_parser import bundle_parser
from pipeline.data.datalist import save_dataset_info
from pipeline.io.checkpoint import load_network_weights


def seeded_checkpoint(bundle: str, datalist: Path, folder: Path, overrides: Mapping[str, Any]) -> Path:
    """Random but seeded weights for ``bundle`` (timing needs no training), saved as ``model.pt``
    with the dataset facts beside it, as a training would leave them."""
    folder.mkdir(parents=True, exist_ok=True)
    info = save_dataset_info(datalist, folder)
    # No model.pt yet to read the dataset facts from: the datalist header saved beside it serves.
    parser = bundle_parser(bundle, "inference", {**overrides, "dataset_info": str(info)})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), folder / "model.pt")
    return folder / "model.pt"


def build_network(
    bundle: str, checkpoint: Path, overrides: Mapping[str, Any]
) -> tuple[torch.nn.Module, dict]:
    """The bundle's network with the checkpoint's weights, and the settings the baseline must share."""
    parser = bundle_parser(bundle, "inference", overrides, checkpoint=checkpoint)
    network = load_network_weights(parser.get_parsed_content("network_def"), checkpoint)
    keys = ("patch_size", "spacing", "ct_window", "modality", "num_classes", "sw_batch_size")
    return network, {key: parser.get_parsed_content(key) for key in keys}


def inference(
    bundle: str,
    images: Sequence[str],
    output_dir: Path,
    checkpoint: Path,
    sample_calls: int | None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[float, SampledNetwork]:
    """Segment ``images`` with the bundle's inference workflow; returns its wall seconds and the
    sampled network (windows, seconds per window)."""
    settings = {"input": list(images), "output_dir": str(output_dir), "overwrite": True}
    parser = bundle_parser(bundle, "inference", {**settings, **(overrides or {})}, checkpoint=checkpoint)
    evaluator = parser.get_parsed_content("evaluator")
    sampled = SampledNetwork(evaluator.network, sample_calls)
    evaluator.network = sampled
    set_determinism(seed=parser["seed"])
    started = time.perf_counter()
    evaluator.run()
    wall = time.perf_counter() - started
    parser.get_parsed_content("case_failures").raise_if_any()
    return wall, sampled


def training_parts(
    bundle: str, datalist: Path, workdir: Path, overrides: Mapping[str, Any], loader: bool = True
) -> dict[str, Any]:
    """The train config's network, optimizer, loss and (if ``loader``) data loader; nothing else."""
    settings = {"datalist": str(datalist), "output_dir": str(workdir), "ckpt_dir": str(workdir / "models")}
    parser = bundle_parser(bundle, "train", {**settings, **overrides})
    set_determinism(seed=parser["seed"])
    names = {"network": "network", "optimizer": "optimizer", "loss": "train::loss"}  # deep supervision's too
    if loader:
        names["loader"] = "train::dataloader"
    return {name: parser.get_parsed_content(key) for name, key in names.items()}
