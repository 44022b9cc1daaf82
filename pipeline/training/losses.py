"""Deep supervision for a network that stacks its heads' outputs, as MONAI's DynUNet does in training."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's DeepSupervisionLoss (weights halving per level, the coarsest heads least) for DynUNet,
    whose training-mode output is its heads stacked on dim 1 (all at full size), not the list the loss
    takes. An unstacked output (evaluation mode, or no deep supervision) gets the plain loss."""

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)
