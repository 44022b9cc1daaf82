"""Progress lines a user can watch: where training is, how it goes, and how long it has left."""

from __future__ import annotations

import logging
import math
import time

from ignite.engine import Engine, Events
from monai.handlers import from_engine

from pipeline.training.budget import TimeBudget

logger = logging.getLogger("medseg.train")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressLogger:
    """Log epoch, iteration, loss, learning rate and time left for the whole run.

    ignite's ProgressBar estimates only the current epoch and MONAI's StatsHandler gives no
    estimate; the time left here is measured since this process started (so a resumed run
    estimates from its own speed), validation time included. With a time ``budget`` it is never more
    than the budget's time left: before the budget has re-planned the epochs, ``max_epochs`` is only an
    upper bound, and a projection from it could promise a thousand hours of a ten-minute run.
    """

    def __init__(
        self, every: int = 1, optimizer: object | None = None, budget: TimeBudget | None = None
    ) -> None:
        self.every = max(1, int(every))
        self.optimizer = optimizer
        self.budget = budget
        self._start: tuple[float, int] | None = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_STARTED, self._mark_start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.log_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.log_epoch)

    def _mark_start(self, trainer: Engine) -> None:
        if self._start is None:
            self._start = (time.perf_counter(), trainer.state.iteration - 1)

    def seconds_left(self, trainer: Engine) -> float:
        """The projection at this process's speed, capped by the budget's time left."""
        budget_left = self.budget.seconds_left() if self.budget is not None else math.inf
        started_at, first_iteration = self._start or (time.perf_counter(), trainer.state.iteration)
        done = trainer.state.iteration - first_iteration
        total = trainer.state.max_epochs * trainer.state.epoch_length
        if done <= 0:
            return max(budget_left, 0.0) if math.isfinite(budget_left) else float("nan")
        projected = (time.perf_counter() - started_at) / done * (total - trainer.state.iteration)
        return max(min(projected, budget_left), 0.0)

    def log_iteration(self, trainer: Engine) -> None:
        state = trainer.state
        loss = from_engine(["loss"], first=True)(state.output)
        in_epoch = (state.iteration - 1) % state.epoch_length + 1
        lr = f"  lr {self.optimizer.param_groups[0]['lr']:.2e}" if self.optimizer is not None else ""
        logger.info(
            "epoch %d/%d  iter %d/%d  loss %.4f%s  ~%s left",
            state.epoch,
            state.max_epochs,
            in_epoch,
            state.epoch_length,
            float(loss),
            lr,
            format_seconds(self.seconds_left(trainer)),
        )

    def log_epoch(self, trainer: Engine) -> None:
        state = trainer.state
        seconds = state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        logger.info(
            "epoch %d/%d done in %.1f s, ~%s left",
            state.epoch,
            state.max_epochs,
            seconds,
            format_seconds(self.seconds_left(trainer)),
        )
