"""Deep supervision: DynUNet's stacked heads through the training's loss, as the unet3d bundle wires it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from pipeline.training import StackedDeepSupervisionLoss
from pipeline.workflows import bundle_dir, config_files, meta_files


def test_stacked_heads_are_weighted_by_level_and_a_plain_output_gets_the_plain_loss() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    heads = torch.randn(2, 3, 3, 8, 8, 8)  # batch, heads (finest first), classes, space
    plain = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = StackedDeepSupervisionLoss(plain)
    by_hand = sum(w * plain(heads[:, level], target) for level, w in enumerate((1.0, 0.5, 0.25)))
    assert float(loss(heads, target)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(loss(heads[:, 0], target)) == pytest.approx(float(plain(heads[:, 0], target)), rel=1e-6)


def test_unet3d_with_deep_supervision_trains_on_its_heads_and_infers_one_output() -> None:
    parser = ConfigParser()
    parser.read_meta(meta_files("unet3d"))
    parser.read_config(config_files("unet3d", "train"))
    parser.update({**tiny("unet3d"), "bundle_root": str(bundle_dir("unet3d")), "deep_supervision": True})
    parser.update({"in_channels": 1, "num_classes": 3, "patch_size": [32, 32, 32]})
    network = parser.get_parsed_content("network_def")
    loss_function = parser.get_parsed_content("train::loss")
    image, label = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    heads = network.train()(image)
    assert heads.shape == (2, 3, 3, 32, 32, 32), "the output and two deep-supervision heads, stacked"
    loss_function(heads, label).backward()
    assert network.deep_supervision_heads[1].conv.conv.weight.grad is not None, "the coarsest head learns"
    assert network.eval()(image).shape == (2, 3, 32, 32, 32)
