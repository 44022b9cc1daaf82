"""Overlap-tile inference of a 2D image larger than the window: the tiles agree at their seams, and
the image's borders get mirrored context (``MirroredBorders``), as in the U-Net paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.inferers import SimpleInferer, SlidingWindowInferer

from pipeline.inference.combine import choose_inferer
from pipeline.inference.windows import MirroredBorders


def box_filter() -> torch.nn.Conv2d:
    """A 3x3 mean over one channel, zero-padded ('same'), as a network's first convolution is."""
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / 9)
    return conv.eval()


def test_tiles_of_a_pointwise_network_agree_with_the_whole_image() -> None:
    image = torch.rand(1, 1, 70, 53)
    network = torch.nn.Conv2d(1, 2, 1).eval()
    tiled = SlidingWindowInferer(roi_size=(16, 16), overlap=0.25, mode="gaussian")
    with torch.no_grad():
        whole, seamed = network(image), MirroredBorders(tiled, 8)(image, network)
    assert seamed.shape == whole.shape
    torch.testing.assert_close(seamed, whole, atol=1e-5, rtol=1e-5)


def test_the_border_sees_the_mirrored_image_not_zeros() -> None:
    image = torch.rand(1, 1, 20, 30) + 1.0
    with torch.no_grad():
        mirrored = MirroredBorders(SimpleInferer(), 4)(image, box_filter())
        expected = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), box_filter().weight)
        zero_padded = box_filter()(image)
    torch.testing.assert_close(mirrored, expected)
    assert (zero_padded[..., 0, :] < mirrored[..., 0, :] - 0.1).all(), "zeros darken the plain border"


def test_a_margin_larger_than_the_image_is_capped() -> None:
    image = torch.rand(1, 1, 5, 40)
    with torch.no_grad():
        out = MirroredBorders(SimpleInferer(), 16)(image, box_filter())
    assert out.shape == image.shape


def test_the_inference_config_wraps_its_inferer_only_when_asked() -> None:
    window = SlidingWindowInferer(roi_size=(16, 16))
    assert choose_inferer(window, False, [], {}, "cpu") is window
    assert isinstance(choose_inferer(window, True, [], {}, "cpu", mirror_border=8), MirroredBorders)
