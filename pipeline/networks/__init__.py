"""Networks that MONAI lacks, written in MONAI's style so bundle configs name them by ``_target_``."""

from pipeline.networks.multiresunet import MultiResBlock, MultiResUNet, ResPath, multires_widths

__all__ = ["MultiResBlock", "MultiResUNet", "ResPath", "multires_widths"]
