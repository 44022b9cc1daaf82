"""Measurements shared by both sides: training steps, forward FLOPs, Dice of written segmentations."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def window_flops(network: torch.nn.Module, patch: list[int], in_channels: int = 1) -> int:
    """FLOPs of one no-grad forward of one window, as torch counts them (convolutions, matmuls),
    on a copy on the meta device: shapes only, no arithmetic (a MultiResUNet window is 1 TFLOP)."""
    counter = FlopCounterMode(display=False)
    shadow = copy.deepcopy(network).to("meta").eval()
    with torch.no_grad(), counter:
        shadow(torch.zeros(1, in_channels, *patch, device="meta"))
    return counter.get_total_flops()


def first_item(batch: Any) -> Any:
    return batch[0] if isinstance(batch, list) else batch


def train_step(parts: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> None:
    network, optimizer = parts["network"], parts["optimizer"]
    network.train()
    device = next(network.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    parts["loss"](network(images.to(device)), labels.to(device)).backward()
    optimizer.step()


def timed_steps(parts: dict[str, Any], batches: Iterator[dict], iterations: int) -> tuple[float, dict]:
    """Mean seconds per iteration, each fetching its batch from ``batches`` (the loader's time counts)."""
    started = time.perf_counter()
    batch: dict = {}
    for _ in range(iterations):
        batch = first_item(next(batches))
        train_step(parts, torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"]))
    return (time.perf_counter() - started) / iterations, batch


def training_seconds(parts: dict[str, Any], loader: Any, seconds: float) -> dict[str, float]:
    """Seconds per iteration with the data pipeline and with one ready-made batch (nnU-Net's 'no
    data loading'): their difference is what the data pipeline costs.

    One batch is fetched before timing (the workers start, the cache fills) and trains one untimed
    step (allocations, kernel choice), whose time sets how many iterations fill about ``seconds``
    (at least one, at most the rest of the epoch): a fast network is timed over several
    iterations, a slow one over one.
    """
    batches = iter(loader)
    first = first_item(next(batches))
    started = time.perf_counter()
    train_step(parts, torch.as_tensor(first["image"]), torch.as_tensor(first["label"]))
    iterations = max(1, round(seconds / (time.perf_counter() - started)))
    iterations = min(iterations, max(1, len(loader) - 1))  # within one epoch: no worker restart timed
    with_data, batch = timed_steps(parts, batches, iterations)
    images, labels = torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"])
    ready_s = timed_steps(parts, iter(lambda: {"image": images, "label": labels}, None), iterations)[0]
    return {"with_data_s": with_data, "ready_tensors_s": ready_s, "iterations": iterations}


def dice(prediction: Path, label: Path, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in the label or the prediction."""
    predicted = np.asarray(nib.load(prediction).dataobj).squeeze()
    truth = np.asarray(nib.load(label).dataobj).squeeze()
    if predicted.shape != truth.shape:
        raise ValueError(f"{prediction} has shape {predicted.shape}, its label {label} {truth.shape}")
    scores = []
    for value in range(1, num_classes):
        p, t = predicted == value, truth == value
        total = p.sum() + t.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


def segmentation_of(image: str, folder: Path) -> Path:
    name = Path(image).name.removesuffix(".gz").removesuffix(".nii")
    return folder / f"{name}_seg.nii.gz"
