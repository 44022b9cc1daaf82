"""Validation every ``interval`` epochs and always at the last one, wherever a time budget put it."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler as MonaiValidationHandler

from pipeline.training.budget import TimeBudget


class ValidationHandler(MonaiValidationHandler):
    """MONAI's ValidationHandler, which also validates the run's last epoch.

    With ``interval`` N, MONAI's handler skips the last epoch unless N divides it, so ``model.pt`` (the
    best validated epoch) could miss the final, best-trained network; a time budget that lowers
    ``max_epochs`` during the run makes that the rule rather than the exception. The last epoch is read
    from the trainer's live ``max_epochs`` when each epoch ends (attach it after the TimeBudget).
    With a ``budget``, the interval widens so that validations keep to their share of it
    (``TimeBudget.validation_interval``).
    """

    def __init__(self, *args: Any, budget: TimeBudget | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def attach(self, engine: Engine) -> None:
        if not self.epoch_level:
            super().attach(engine)
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self.due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)

    def due(self, engine: Engine, epoch: int) -> bool:
        interval = self.interval
        if self.budget is not None:
            interval = max(interval, self.budget.validation_interval(engine.state.max_epochs))
        return epoch % interval == 0 or epoch >= engine.state.max_epochs
