"""A wall-clock training budget, so that bundles compared on the same data get the same time."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class TimeBudget:
    """Fit training into ``minutes`` of wall-clock time by re-planning the number of epochs.

    Cutting a run off when the time is up would leave its learning-rate schedule half-way (a
    cosine that never anneals), which penalises slow networks twice. Instead, after every epoch
    the remaining epochs are re-planned from the mean epoch time (validation included) and the
    schedule's length (``t_total`` of MONAI's warm-up schedules) follows, so every bundle ends its
    schedule inside the budget. ``max_epochs`` stays an upper bound. Under torchrun, rank 0's plan
    is broadcast so every rank stops at the same epoch.
    """

    def __init__(self, minutes: float | None, lr_scheduler: object | None = None) -> None:
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.lr_scheduler = lr_scheduler
        self._started = 0.0
        self._first_epoch = 0
        self._max_epochs = 0

    def attach(self, trainer: Engine) -> None:
        if self.seconds is None:
            return
        trainer.add_event_handler(Events.STARTED, self._start)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._replan)

    def _start(self, trainer: Engine) -> None:
        self._started = time.perf_counter()
        self._first_epoch = trainer.state.epoch  # a resumed run plans from where it resumed
        self._max_epochs = trainer.state.max_epochs

    def planned_epochs(self, epoch: int) -> int:
        """Epochs that fit the budget at the mean epoch time so far, never fewer than done."""
        done = epoch - self._first_epoch
        per_epoch = (time.perf_counter() - self._started) / max(done, 1)
        fitting = self._first_epoch + math.floor(self.seconds / per_epoch)
        return int(min(self._max_epochs, max(epoch, fitting)))

    def _replan(self, trainer: Engine) -> None:
        planned = self._agreed(self.planned_epochs(trainer.state.epoch))
        if planned != trainer.state.max_epochs:
            first_plan = trainer.state.epoch == self._first_epoch + 1
            level = logging.INFO if first_plan else logging.DEBUG  # later plans move by an epoch or two
            logger.log(level, "time budget %.1f min: training for %d epochs", self.seconds / 60, planned)
            trainer.state.max_epochs = planned
            if hasattr(self.lr_scheduler, "t_total"):
                self.lr_scheduler.t_total = planned

    @staticmethod
    def _agreed(planned: int) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return planned
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        decision = torch.tensor(planned, device=device)
        dist.broadcast(decision, src=0)
        return int(decision.item())
