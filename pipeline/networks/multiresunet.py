"""MultiResUNet (Ibtehaz and Rahman, Neural Networks 121, 2020; arXiv 1902.04049), in 2D and 3D.

MONAI has no MultiResUNet, so it is written here from MONAI's blocks and layer factories and takes
MONAI's arguments (``spatial_dims``, ``norm``, ``act``, ``dropout``), so a bundle config can swap
it for ``BasicUNet`` by changing ``_target_``.

Two ideas from the paper replace the U-Net's pair of convolutions and its plain skip connections:

- the *MultiRes block*: three chained 3x3(x3) convolutions, whose outputs (receptive fields 3, 5
  and 7) are concatenated, widths W/6, W/3 and W/2 of W = alpha x U, where U is the width of the
  U-Net level it replaces; a 1x1(x1) convolution shortcut is added to the concatenation;
- the *Res path*: each skip connection passes through a chain of 3x3(x3) convolutions with 1x1(x1)
  residual shortcuts, 4, 3, 2 and 1 of them from the shallowest to the deepest level, to narrow
  the semantic gap between encoder and decoder features.

Normalisation and activation are placed as in the authors' Keras reference implementation
(github.com/nibtehaz/MultiResUNet): conv -> norm -> act in the chains, conv -> norm (no act) in
the shortcuts, a norm over the concatenation, and act -> norm after each residual sum.
Departures, each for a reason: the output is ``out_channels`` logits from a 1x1(x1) convolution
(the losses apply softmax/sigmoid themselves, so the paper's final norm and sigmoid are dropped);
``norm`` is any MONAI norm (the paper's batch norm by default; with affine norms every norm has a
scale and a shift, where Keras omits the scale after convolutions); odd sizes are padded at the
skips as MONAI's ``BasicUNet`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

# The authors' split of W into the three chained convolutions (their code rounds each down).
WIDTH_FRACTIONS = (0.167, 0.333, 0.5)


def multires_widths(units: int, alpha: float = 1.67) -> tuple[int, int, int]:
    """The widths of a MultiRes block's three convolutions for a U-Net level of ``units`` channels."""
    total = alpha * units
    return tuple(int(total * fraction) for fraction in WIDTH_FRACTIONS)  # type: ignore[return-value]


def _conv_norm(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    act: tuple | str | None,
    norm: tuple | str | None,
    dropout: tuple | str | float | None = None,
) -> Convolution:
    """conv -> norm -> act, 'same' padding; no conv bias where a norm follows (it would cancel it)."""
    return Convolution(
        spatial_dims, in_channels, out_channels, kernel_size=kernel_size, act=act, norm=norm,
        dropout=dropout, bias=norm is None,
    )  # fmt: skip


class MultiResBlock(nn.Module):
    """Three chained convolutions concatenated (receptive fields 3, 5, 7) plus a 1x1(x1) shortcut."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        units: int,
        alpha: float = 1.67,
        act: tuple | str | None = ("relu", {"inplace": True}),
        norm: tuple | str | None = "batch",
        dropout: tuple | str | float | None = None,
    ) -> None:
        super().__init__()
        widths = multires_widths(units, alpha)
        if min(widths) < 1:
            raise ValueError(
                f"a MultiRes block of {units} units with alpha={alpha} has a zero width: {widths}"
            )
        self.out_channels = sum(widths)
        inputs = (in_channels, *widths[:-1])
        self.chain = nn.ModuleList(
            _conv_norm(spatial_dims, cin, cout, 3, act, norm, dropout)
            for cin, cout in zip(inputs, widths, strict=True)
        )
        self.concat_norm = ADN("N", self.out_channels, norm=norm, norm_dim=spatial_dims)
        self.shortcut = _conv_norm(spatial_dims, in_channels, self.out_channels, 1, None, norm)
        self.post = ADN("AN", self.out_channels, act=act, norm=norm, norm_dim=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        y = x
        for conv in self.chain:
            y = conv(y)
            outputs.append(y)
        return self.post(self.concat_norm(torch.cat(outputs, dim=1)) + self.shortcut(x))


class ResPath(nn.Module):
    """A skip connection through ``length`` 3x3(x3) convolutions, each with a 1x1(x1) residual shortcut."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        length: int,
        act: tuple | str | None = ("relu", {"inplace": True}),
        norm: tuple | str | None = "batch",
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            _conv_norm(spatial_dims, channels, channels, 3, act, norm) for _ in range(length)
        )
        self.shortcuts = nn.ModuleList(
            _conv_norm(spatial_dims, channels, channels, 1, None, norm) for _ in range(length)
        )
        self.posts = nn.ModuleList(
            ADN("AN", channels, act=act, norm=norm, norm_dim=spatial_dims) for _ in range(length)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, shortcut, post in zip(self.convs, self.shortcuts, self.posts, strict=True):
            x = post(conv(x) + shortcut(x))
        return x


def _pad_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pad the far end of each axis to the skip's size: 2x pooling floors odd sizes (as MONAI's UpCat)."""
    pad = []
    for axis in reversed(range(2, x.ndim)):
        pad += [0, reference.shape[axis] - x.shape[axis]]
    return nn.functional.pad(x, pad, mode="replicate") if any(pad) else x


class MultiResUNet(nn.Module):
    """MultiResUNet: MultiRes blocks at every level, Res paths on the skips, logits out.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: input channels and classes (the output is logits).
        features: U per level, shallowest first (the paper: 32, 64, 128, 256, 512); a level's
            MultiRes block is int(aU/6) + int(aU/3) + int(aU/2) channels wide, a = ``alpha``.
        alpha: the paper's 1.67, which keeps the parameter count near the U-Net's of the same U.
        act, norm, dropout: MONAI layer-factory specifications; dropout applies in the blocks'
            chained convolutions.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        alpha: float = 1.67,
        act: tuple | str | None = ("relu", {"inplace": True}),
        norm: tuple | str | None = "batch",
        dropout: tuple | str | float | None = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3) or len(features) < 2:
            raise ValueError(f"MultiResUNet needs spatial_dims 2 or 3 and two or more features, got "
                             f"spatial_dims={spatial_dims}, features={list(features)}")  # fmt: skip
        widths = [sum(multires_widths(units, alpha)) for units in features]
        depth = len(features) - 1
        layers = {"alpha": alpha, "act": act, "norm": norm, "dropout": dropout}
        self.encoder = nn.ModuleList(
            MultiResBlock(spatial_dims, cin, units, **layers)
            for cin, units in zip([in_channels, *widths[:-1]], features, strict=True)
        )
        self.res_paths = nn.ModuleList(
            ResPath(spatial_dims, widths[i], depth - i, act, norm) for i in range(depth)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        deconv = Conv[Conv.CONVTRANS, spatial_dims]
        self.upsamples = nn.ModuleList(
            deconv(widths[i + 1], features[i], kernel_size=2, stride=2) for i in range(depth)
        )
        self.decoder = nn.ModuleList(
            MultiResBlock(spatial_dims, features[i] + widths[i], features[i], **layers) for i in range(depth)
        )
        self.output = Conv[Conv.CONV, spatial_dims](widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poolings = len(self.res_paths)
        if min(x.shape[2:]) < 2**poolings:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for {poolings} "
                             f"2x poolings: every axis needs at least {2**poolings} voxels")  # fmt: skip
        x = self.encoder[0](x)
        skips = []
        for res_path, encode in zip(self.res_paths, self.encoder[1:], strict=True):
            skips.append(res_path(x))
            x = encode(self.pool(x))
        levels = zip(reversed(self.upsamples), reversed(self.decoder), reversed(skips), strict=True)
        for upsample, decode, skip in levels:
            x = decode(torch.cat([_pad_to(upsample(x), skip), skip], dim=1))
        return self.output(x)
