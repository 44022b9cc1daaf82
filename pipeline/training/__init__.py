"""Training-time handlers that MONAI's bundles name in their configs."""

from pipeline.training.budget import TimeBudget
from pipeline.training.checkpoints import TrainingCheckpoints
from pipeline.training.losses import StackedDeepSupervisionLoss
from pipeline.training.progress import ProgressLogger
from pipeline.training.validation import ValidationHandler

__all__ = [
    "ProgressLogger",
    "StackedDeepSupervisionLoss",
    "TimeBudget",
    "TrainingCheckpoints",
    "ValidationHandler",
]
