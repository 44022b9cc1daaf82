"""Same data, config and seed on a CPU: the same losses and metrics, data loader workers included.

``set_determinism(seed)`` runs first in every workflow (``initialize``); MONAI's DataLoader then
seeds each worker's random transforms from torch's generator, so two workers give the same
augmentations run after run. A different seed must change them, or the test would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny
from mlflow.tracking import MlflowClient

from pipeline.workflows import BUNDLES_DIR, train

# Two loader workers (seeded per worker), small batches so an epoch has several iterations.
SETTINGS = {**tiny("unet3d"), "num_workers": 2, "batch_size": 1}
METRICS = ("train_loss", "val_mean_dice", "val_mean_iou", "val_dice_organ", "val_iou_core")


def one_epoch(datalist: Path, root: Path, name: str, seed: int = 0) -> dict[str, list[float]]:
    """Train one epoch as run ``name`` of the MLflow store in ``root``; its losses and metrics."""
    uri = f"sqlite:///{root / 'mlruns.db'}"
    settings = {**SETTINGS, "seed": seed, "tracking_uri": uri, "run_name": name}
    train("unet3d", datalist, root / name, epochs=1, overrides=settings, check_data=False, plan=False)
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"run_name = '{name}'"
    )
    return {key: [m.value for m in client.get_metric_history(run.info.run_id, key)] for key in METRICS}


def test_the_seed_decides_every_loss_and_metric(
    phantom_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    assert "set_determinism(seed=@seed)" in (BUNDLES_DIR / "common" / "train.yaml").read_text()
    first = one_epoch(phantom_datalist, tmp_path, "first")
    second = one_epoch(phantom_datalist, tmp_path, "second")
    assert len(first["train_loss"]) == 2 and all(first.values())
    assert first == second, "bit for bit the same record"
    other = one_epoch(phantom_datalist, tmp_path, "other", seed=1)
    assert other["train_loss"] != first["train_loss"], "the seed reaches the shuffle and augmentations"
