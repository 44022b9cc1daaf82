"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015; arXiv 1505.04597), from MONAI's BasicUNet.

MONAI's ``BasicUNet`` is that network's skeleton: per level two 3x3 convolutions with an activation,
2x2 max pooling down, 2x2 transposed convolutions up, concatenated skips, a 1x1 output convolution,
five levels. What this class adds is the paper's widths (64 doubling to 1024) and its dropout, which
sits only at the end of the contracting path ("drop-out layers at the end of the contracting path
perform further implicit data augmentation"), where BasicUNet would put it after every convolution.

Departures, each for a reason: 'same' padding instead of the paper's unpadded convolutions (the
output then has the input's size, and the sliding window's mirrored borders give the overlap-tile
strategy's context); instance normalisation after each convolution (the paper has none; with it a
network trains in minutes rather than a day, at batches of a few patches); the last up-convolution
keeps its 128 channels before the concatenation (BasicUNet's ``halves=False``).

Its up-sampling steps pad the up-sampled map only where a pooled edge was odd (``UpCatOddEdges``):
BasicUNet's always pads, by zero voxels where the sizes match, and that no-op replicate pad breaks
``torch.compile``'s backward with channels-last (torch 2.13's inductor fails a stride assertion in
``replication_pad2d_backward``: ``python -m bench.compile_speed --bundles unet2d``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import UpCat
from torch import nn

PAPER_FEATURES = (64, 128, 256, 512, 1024)
UP_STEPS = ("upcat_4", "upcat_3", "upcat_2", "upcat_1")


class UpCatOddEdges(UpCat):
    """MONAI's ``UpCat`` (same weights, same result) with the replicate pad left out where no edge
    needs it. Written as TorchScript accepts it: the model zoo's ``ckpt_export`` scripts the network."""

    def forward(self, x: torch.Tensor, x_e: torch.Tensor | None) -> torch.Tensor:
        x_0 = self.upsample(x)
        if x_e is None:
            return self.convs(x_0)
        dimensions = len(x.shape) - 2
        pad = [0] * (dimensions * 2)
        needed = False
        for axis in range(dimensions):
            if x_e.shape[-axis - 1] != x_0.shape[-axis - 1]:
                pad[axis * 2 + 1] = 1  # one voxel after an odd edge's last, as UpCat pads it
                needed = True
        if needed and self.is_pad:
            x_0 = nn.functional.pad(x_0, pad, "replicate")
        return self.convs(torch.cat([x_e, x_0], dim=1))


class RonnebergerUNet(BasicUNet):
    """``features``: the five levels' widths (the last up-sampling returns to the first's)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = PAPER_FEATURES,
        dropout: float = 0.5,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = ("instance", {"affine": True}),
    ) -> None:
        if len(features) != 5:
            raise ValueError(f"features: five widths, one per level, not {list(features)}")
        super().__init__(
            spatial_dims, in_channels, out_channels, features=(*features, features[0]), act=act,
            norm=norm, dropout=0.0, upsample="deconv",
        )  # fmt: skip
        self.down_4 = nn.Sequential(self.down_4, nn.Dropout(dropout))  # the bottom of the "U"
        for name in UP_STEPS:
            getattr(self, name).__class__ = UpCatOddEdges  # its modules and weights stay as they are
