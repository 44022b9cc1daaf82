"""Networks that MONAI lacks, written in MONAI's style so bundle configs name them by ``_target_``,
and how every bundle places its network on the device."""

import torch

from pipeline.networks.compiled import compile_in_place, compile_problem
from pipeline.networks.multiresunet import MultiResBlock, MultiResUNet, ResPath, multires_widths
from pipeline.networks.ronneberger import RonnebergerUNet

__all__ = [
    "MultiResBlock",
    "MultiResUNet",
    "ResPath",
    "RonnebergerUNet",
    "compile_in_place",
    "compile_problem",
    "multires_widths",
    "to_device",
]


def to_device(
    network: torch.nn.Module, device: torch.device | str, channels_last: bool, compiled: bool = False
) -> torch.nn.Module:
    """The network on ``device``, its convolution weights channels-last when asked, and compiled
    (``torch.compile``, in place) when asked: the bundles' ``compile`` key, off by default.

    Channels-last 3D convolutions run 1.2-1.7x faster on CPU (oneDNN) for the convolutional
    bundles, in inference and training (``make bench``); the input follows the weights' layout.
    A 2D network (4-D weights) takes the 2D layout. Compiling comes last, so that it traces the
    layout the network will run in. Checkpoints are unaffected: ``state_dict`` values load into
    either layout, and a network compiled in place keeps its own keys.
    """
    network = network.to(device)
    if channels_last:
        planar = max((p.dim() for p in network.parameters()), default=0) < 5
        network = network.to(memory_format=torch.channels_last if planar else torch.channels_last_3d)
    return compile_in_place(network, device) if compiled else network
