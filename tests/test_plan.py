"""plan.yaml as a config layer, `medseg plan`, and the planned CT normalisation in the preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.transforms import Compose, CropForegroundd

from pipeline.cli import main
from pipeline.planning import rules
from pipeline.planning.plan import Plan, make_plan, read_plan, write_plan
from pipeline.transforms import ClipZScored, foreground_selector, is_nonzero, normalise_intensity
from pipeline.workflows import config_files
from tests.test_planning_rules import hippocampus_like, made_up

CPU = rules.Device("cpu", 16 * 2**30, 2)


def by_voxels(patch: tuple[int, ...], batch: int, _: dict) -> int:
    return int(np.prod(patch)) * batch * 2000


def ct_datalist(tmp_path: Path) -> Path:
    path = tmp_path / "ct.json"
    path.write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"}}))
    return path


def test_plan_yaml_composes_after_the_bundle_model(tmp_path: Path) -> None:
    fp = made_up([(60, 60, 60)] * 4, [(1.0, 1.0, 1.0)] * 4, modality="CT")
    timed = []

    def seconds(patch: tuple[int, ...], batch: int, keys: dict) -> float:  # 0.01 s per channel of width
        timed.append(keys["features"][0])
        return keys["features"][0] * 0.01

    plan = make_plan(fp, "unet3d", CPU, minutes=10, step_bytes=by_voxels, step_seconds=seconds)
    # 480 s of training at 1.6x the step: widths 8, 16, 24 reach 1000 steps, 32 (937) does not
    assert timed == [8, 16, 24, 32] and plan.network["features"] == [24, 48, 96, 192, 320]
    assert "Steps: expected about 1250 training steps in 10 min" in plan.to_yaml()
    path = write_plan(plan, tmp_path / "plan.yaml")
    text = path.read_text()
    assert all("  # " in line for line in text.splitlines() if not line.startswith("#"))
    assert yaml.safe_load(text) == plan.config() and read_plan(path) == Plan.from_config(plan.config())
    parser = ConfigParser()
    parser.read_config([*config_files("unet3d", "train"), str(path)])
    defaults = ConfigParser()
    defaults.read_config(config_files("unet3d", "train"))
    assert set(plan.config()) <= set(defaults.get()), "the plan may only set keys the bundles read"
    parser["dataset_info"] = str(ct_datalist(tmp_path))
    assert parser.get_parsed_content("patch_size") == list(plan.patch_size) == [64, 64, 64]
    assert parser.get_parsed_content("spacing") == list(plan.spacing)
    assert parser.get_parsed_content("time_budget_minutes") == 10
    network = parser.get_parsed_content("network_def")
    assert network.input_block.conv1.conv.out_channels == 24  # the budget's width, not the bundle's 32
    assert network.bottleneck.conv1.conv.out_channels == 320
    assert network.strides == [1, [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # four for the 64^3 patch
    steps = parser.get_parsed_content("preprocessing_steps")
    (normaliser,) = [s for s in steps if isinstance(s, ClipZScored)]
    assert float(normaliser.mean[0]) == pytest.approx(plan.ct_mean, rel=1e-6)


def test_a_budget_too_short_for_the_median_patch_gets_a_smaller_one() -> None:
    """Steps whose time follows the voxels: at the median's 64^3 patch even the 8-wide network makes
    too few steps in 2 minutes, so the patch shrinks until about 1000 fit, and the plan says so."""
    fp = made_up([(64, 64, 64)] * 4, [(1.0, 1.0, 1.0)] * 4)

    def seconds(patch: tuple[int, ...], batch: int, keys: dict) -> float:
        return float(np.prod(patch)) * keys["features"][0] * 1.6e-7  # 8-wide at 64^3: 0.34 s, 177 steps

    unbudgeted = make_plan(fp, "unet3d", CPU, step_bytes=by_voxels)
    plan = make_plan(fp, "unet3d", CPU, minutes=2, step_bytes=by_voxels, step_seconds=seconds)
    assert unbudgeted.patch_size == (64, 64, 64) and plan.network["features"][0] == 8
    assert np.prod(plan.patch_size) * 1000 <= np.prod(unbudgeted.patch_size) * 177 * 1.1
    assert "to fit the time budget" in plan.reasons["patch_size"]
    steps = int(plan.to_yaml().split("expected about ")[1].split()[0])
    assert steps >= 1000, plan.to_yaml()
    assert len(plan.network["strides"]) < len(unbudgeted.network["strides"]), "the depth follows the patch"


def test_a_budget_narrows_unetr_s_vit_with_its_decoder(tmp_path: Path) -> None:
    """UNETR's ViT holds its time, so a budget narrows it: at the base width 8, hidden 384 (6 heads of 64,
    MLP 1536) makes 1000 steps in 10 min where the bundle's own ViT-Base (16: hidden 768) does not."""

    def seconds(patch: tuple[int, ...], batch: int, keys: dict) -> float:
        return keys["hidden_size"] * 6e-4  # 384: 0.23 s a step, ~1300 steps; 768: ~650

    plan = make_plan(hippocampus_like(), "unetr", CPU, minutes=10, step_bytes=by_voxels, step_seconds=seconds)
    assert plan.network == {"feature_size": 8, "hidden_size": 384, "mlp_dim": 1536, "num_heads": 6}
    assert "base width 8 widest whose expected steps" in plan.reasons["feature_size"]
    assert make_plan(hippocampus_like(), "unetr", CPU, step_bytes=by_voxels).network["hidden_size"] == 768
    path = write_plan(plan, tmp_path / "plan.yaml")
    parser = ConfigParser()
    parser.read_config([*config_files("unetr", "train"), str(path)])
    parser.update({"in_channels": 1, "num_classes": 3})
    network = parser.get_parsed_content("network_def")
    block = network.vit.blocks[0]
    assert (block.attn.num_heads, block.mlp.linear1.out_features) == (6, 1536)
    assert network(torch.zeros(1, 1, *plan.patch_size)).shape == (1, 3, *plan.patch_size)


def test_planned_resunet_strides_build_and_fit_the_patch(tmp_path: Path) -> None:
    plan = make_plan(hippocampus_like(), "resunet", CPU)  # the real memory probe of the bundle's UNet
    assert plan.patch_size == (40, 56, 40)
    path = write_plan(plan, tmp_path / "plan.yaml")
    parser = ConfigParser()
    parser.read_config([*config_files("resunet", "train"), str(path)])
    parser.update({"in_channels": 1, "num_classes": 3})
    network = parser.get_parsed_content("network_def")
    out = network(torch.zeros(1, 1, *plan.patch_size))
    assert out.shape == (1, 3, *plan.patch_size)


def test_medseg_plan_writes_the_plan_and_prints_its_summary(
    phantom_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(phantom_datalist), "--bundle", "resunet", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patch" in printed and "spacing" in printed and str(out) in printed
    plan = read_plan(out)
    assert plan.spacing == (1.2, 1.2, 1.5)  # the phantoms' own
    assert main(["plan", str(tmp_path / "missing.json")]) == 2


def test_ct_is_clipped_and_z_scored_with_the_planned_figures_per_channel() -> None:
    hu = torch.tensor([[[[-1000.0, -100.0, 50.0, 200.0, 1500.0]]], [[[-1000.0, 0.0, 100.0, 300.0, 900.0]]]])
    planned = normalise_intensity(
        "image", "CT", ct_clip=[[-100, 200], [0, 300]], ct_mean=[50, 100], ct_std=[50, 100]
    )
    out = planned({"image": hu})["image"]
    assert torch.allclose(out[0].flatten(), torch.tensor([-3.0, -3.0, 0.0, 3.0, 3.0]))
    assert torch.allclose(out[1].flatten(), torch.tensor([-1.0, -1.0, 0.0, 2.0, 2.0]))
    window = normalise_intensity("image", "CT")({"image": hu[:1]})["image"]  # no plan: the old window
    assert torch.allclose(window.flatten(), torch.tensor([0.0, 75 / 425, 225 / 425, 375 / 425, 1.0]))
    with pytest.raises(ValueError, match="ct_mean"):
        normalise_intensity("image", "CT", ct_clip=[-100, 200])


def test_the_foreground_crop_still_works_after_a_z_score() -> None:
    """Air around a body: a z-score moves the air off zero, so the crop is taken before it."""
    image = torch.full((1, 20, 20, 20), -1000.0)
    image[:, 5:15, 6:12, 4:18] = 40.0
    clip = [-100.0, 200.0]
    steps = [
        CropForegroundd("image", source_key="image", select_fn=foreground_selector("CT", ct_clip=clip)),
        normalise_intensity("image", "CT", ct_clip=clip, ct_mean=50.0, ct_std=50.0),
    ]
    out = Compose(steps)({"image": image})["image"]
    assert out.shape == (1, 10, 6, 14)
    assert not bool(
        is_nonzero(
            normalise_intensity("image", "CT", ct_clip=clip, ct_mean=50.0, ct_std=50.0)({"image": image})[
                "image"
            ]
        )
        .logical_not()
        .any()
    )  # fmt: skip  (why the old order kept it all)
    # without a plan the crop is the old one: HU above the window's floor
    old = CropForegroundd("image", source_key="image", select_fn=foreground_selector("CT"))({"image": image})
    assert old["image"].shape == (1, 10, 6, 14)
    mri = CropForegroundd("image", source_key="image", select_fn=foreground_selector("MRI"))(
        {"image": torch.where(image > 0, image, 0.0)}
    )
    assert mri["image"].shape == (1, 10, 6, 14)
