"""``make bench`` in its --quick smoke mode, so the harness cannot rot unnoticed (the real run is long)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bench.measure import train_step
from bench.ours import training_parts
from bench.run import bundle_overrides
from pipeline.paths import bundle_dir

ROOT = Path(__file__).resolve().parents[1]

BUNDLE_FIELDS = {
    "bundle", "inference_s_ours", "inference_s_baseline", "inference_speedup", "dice_ours", "dice_baseline",
    "forward_fraction_of_peak", "train_it_s_ours", "train_it_s_baseline", "train_speedup", "data_overhead",
    "peak_mem_gib",
}  # fmt: skip


@pytest.mark.long  # a minute: every stage of the bench in fresh processes
def test_quick_bench_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "bench.run", "--quick", "--bundles", "resunet", "--out", str(out),
               "--data-dir", str(tmp_path / "data")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["matmul_gflops"] > 0
    assert {"cpu", "threads", "torch", "monai"} <= set(results["machine"])
    (row,) = results["bundles"]
    assert set(row) >= BUNDLE_FIELDS
    assert row["inference_s_ours"] > 0 and row["inference_s_baseline"] > 0
    assert 0 < row["forward_fraction_of_peak"] < 5
    assert row["train_it_s_ours"] > 0 and 0 <= row["data_overhead"] <= 1
    assert row["dice_ours"] is None  # no --checkpoints: no Dice
    assert [r["cases"] for r in results["scaling"]["cache"]] == [1, 2]
    assert "| resunet |" in done.stdout


def test_a_training_step_takes_the_trainers_loss_deep_supervision_included(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    """unet3d trains with deep supervision: its heads stack into one more axis that only the trainer's
    loss (``train::loss``) unpacks; the plain ``loss`` refuses them (the bench once timed nothing)."""
    overrides = bundle_overrides("unet3d", quick=True)
    model = ConfigParser.load_config_file(str(bundle_dir("unet3d") / "configs" / "model.yaml"))
    assert model["deep_supervision"], "unet3d's default: what this test is about"
    parts = training_parts("unet3d", phantom_datalist, tmp_path, overrides, loader=False)
    before = [weight.detach().clone() for weight in parts["network"].parameters()]
    images = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    train_step(parts, images, (images > 0).float())
    after = parts["network"].parameters()
    assert any(not torch.equal(old, new) for old, new in zip(before, after, strict=True)), "a step was taken"
