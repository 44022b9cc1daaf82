"""A wall-clock training budget, so that bundles compared on the same data get the same time."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

# An epoch chosen by the budget trains for at most this share of it: ten or more epochs, so the number
# of epochs (and with it the learning-rate schedule) can be re-planned often enough to fill the budget.
EPOCH_SHARE = 0.1
# Validations take at most this share of a budget, the always-validated last epoch included: on the
# hippocampus split (32 validation cases, 33 s a validation on 2 cores) validating every epoch took a
# third of 10 minutes that training steps could use.
VALIDATION_SHARE = 0.1


def epoch_length(iterations_per_epoch: int | None) -> int | None:
    """``iterations_per_epoch`` checked for SupervisedTrainer's ``epoch_length`` (None: one pass of the
    data loader), so a bad value is one clear error rather than ignite's traceback."""
    if iterations_per_epoch is None:
        return None
    if (
        isinstance(iterations_per_epoch, bool)
        or not isinstance(iterations_per_epoch, int)
        or iterations_per_epoch < 1
    ):
        raise ValueError(
            f"iterations_per_epoch must be a positive whole number or null, not {iterations_per_epoch!r}"
        )
    return iterations_per_epoch


class TimeBudget:
    """Fit training into ``minutes`` of wall-clock time by re-planning the number of epochs.

    Cutting a run off when the time is up would leave its learning-rate schedule half-way (a
    cosine that never anneals), which penalises slow networks twice. Instead, after every epoch
    the remaining epochs are re-planned from the mean epoch time (validation included, and time kept
    for the validation the last epoch always runs) and the schedule's length (``t_total`` of MONAI's
    warm-up schedules) follows, so every bundle ends its schedule inside the budget. ``max_epochs``
    stays an upper bound.

    The budget also acts within an epoch, so one slow epoch cannot overrun it:

    - without ``iterations_per_epoch`` a fresh run's first epoch ends once it has trained for
      ``EPOCH_SHARE`` of the budget, and every later epoch has that length: shorter than a pass of a
      large dataset's loader (ignite continues its iterator across epochs), several passes of a small
      one (ignite restarts it), so a dataset of six cases is not validated after every third step.
    - whenever the next iteration would end after the budget (less the time of a validation, once one
      was measured), the current epoch becomes the last: it ends now, is validated and gives model.pt.
      An epoch of fixed length cut this way is left part-done in the checkpoint (ignite counts epochs
      in iterations), so a resume with more epochs first finishes it.

    Under torchrun, rank 0's decisions are broadcast so every rank stops at the same iteration. Attach
    it before the ValidationHandler: the validation of an epoch then sees the epochs this budget left.
    """

    def __init__(
        self,
        minutes: float | None,
        lr_scheduler: object | None = None,
        iterations_per_epoch: int | None = None,
        validator: Engine | None = None,
    ) -> None:
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.lr_scheduler = lr_scheduler
        self.fixed_length = iterations_per_epoch is not None
        self.validator = validator
        self._started: float | None = None
        self._first_epoch = 0
        self._max_epochs = 0
        self._choosing_length = False  # the first epoch of a fresh run, whose length this budget picks
        self._spent = False
        self._mark = 0.0
        self._steps = 0
        self._step_seconds = 0.0
        self._validations = 0
        self._validation_began = 0.0
        self._validation_seconds: float | None = None

    def attach(self, trainer: Engine) -> None:
        if self.seconds is None:
            return
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._replan)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._validation_started)
            self.validator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _epoch_started(self, trainer: Engine) -> None:
        """The clock starts with the first epoch, after a resume (at STARTED) has set where it stands."""
        self._mark = time.perf_counter()
        if self._started is not None:
            return
        self._started = self._mark
        self._first_epoch = trainer.state.epoch - 1  # a resumed run plans from where it resumed
        self._max_epochs = trainer.state.max_epochs
        self._choosing_length = not self.fixed_length and trainer.state.iteration == 0

    def seconds_left(self) -> float:
        """Budget time left (infinite without a budget, the whole budget before the first epoch)."""
        if self.seconds is None:
            return math.inf
        if self._started is None:
            return self.seconds
        return self.seconds - (time.perf_counter() - self._started)

    def validation_interval(self, epochs: int) -> int:
        """Epochs between validations so that those of ``epochs`` take at most ``VALIDATION_SHARE`` of
        the budget: 1 without a budget or before a validation was timed (the first one measures)."""
        if self.seconds is None or not self._validation_seconds:
            interval = 1
        else:
            validations = max(1, math.floor(VALIDATION_SHARE * self.seconds / self._validation_seconds))
            interval = max(1, math.ceil(epochs / validations))
        (interval,) = self._agreed(interval)  # every rank validates at the same epochs
        return interval

    def _validation_started(self, _: Engine) -> None:
        self._validation_began = time.perf_counter()

    def _validation_completed(self, _: Engine) -> None:
        self._validations += 1
        self._validation_seconds = time.perf_counter() - self._validation_began

    def _iteration_completed(self, trainer: Engine) -> None:
        now = time.perf_counter()
        self._steps += 1
        self._step_seconds += now - self._mark  # training steps only: data loading in, validation out
        self._mark = now
        state = trainer.state
        if self._spent or state.epoch_length is None:  # None: an iterable loader's first pass, length unknown
            return
        in_epoch = state.iteration - (state.epoch - 1) * state.epoch_length
        per_step = max(self._step_seconds / self._steps, 1e-9)
        length = self._chosen_length(state.epoch_length, in_epoch, per_step)
        cut = in_epoch < length and per_step > self.seconds_left() - (self._validation_seconds or 0.0)
        length, cut = self._agreed(length, int(cut))
        if length != state.epoch_length:
            state.epoch_length = length
        if cut:
            self._cut(trainer, in_epoch)

    def _chosen_length(self, current: int, in_epoch: int, per_step: float) -> int:
        """The first epoch's length: ``EPOCH_SHARE`` of the budget at the mean step time so far, not
        shorter than the steps done."""
        if not self._choosing_length:
            return current
        return int(max(in_epoch, math.floor(EPOCH_SHARE * self.seconds / per_step)))

    def _cut(self, trainer: Engine, in_epoch: int) -> None:
        """The budget cannot take another step: this epoch is the last and ends now."""
        state = trainer.state
        self._spent = True
        logger.info(
            "time budget %.1f min spent: epoch %d is the last, ended at its iteration %d",
            self.seconds / 60, state.epoch, in_epoch,
        )  # fmt: skip
        self._set_epochs(state.epoch)
        state.max_epochs = state.epoch
        if self._choosing_length:
            state.epoch_length = in_epoch  # the first epoch's length is still open: it ends here
        else:
            trainer.terminate_epoch()

    def planned_epochs(self, epoch: int) -> int:
        """Epochs that fit the budget at the mean epoch time so far, never fewer than done.

        Time is kept for the validation that the last epoch always runs, less the share of it that the
        mean already holds (validations so far per epoch)."""
        done = epoch - self._first_epoch
        per_epoch = (time.perf_counter() - self._started) / max(done, 1)
        validated_share = min(1.0, self._validations / max(done, 1))
        reserve = (1.0 - validated_share) * (self._validation_seconds or 0.0)
        fitting = self._first_epoch + math.floor(max(self.seconds - reserve, 0.0) / per_epoch)
        return int(min(self._max_epochs, max(epoch, fitting)))

    def _replan(self, trainer: Engine) -> None:
        self._choosing_length = False  # the first epoch ended: its length is every epoch's
        if self._spent:
            return
        (planned,) = self._agreed(self.planned_epochs(trainer.state.epoch))
        if planned != trainer.state.max_epochs:
            first_plan = trainer.state.epoch == self._first_epoch + 1
            level = logging.INFO if first_plan else logging.DEBUG  # later plans move by an epoch or two
            logger.log(
                level, "time budget %.1f min: training for %d epochs of %d iterations",
                self.seconds / 60, planned, trainer.state.epoch_length,
            )  # fmt: skip
            trainer.state.max_epochs = planned
            self._set_epochs(planned)

    def _set_epochs(self, epochs: int) -> None:
        for length in ("t_total", "total_iters"):  # MONAI's warm-up schedules; torch's PolynomialLR
            if hasattr(self.lr_scheduler, length):
                setattr(self.lr_scheduler, length, epochs)

    @staticmethod
    def _agreed(*decision: int) -> tuple[int, ...]:
        """Rank 0's decision on every rank (one small broadcast), so all stop at the same step."""
        if not (dist.is_available() and dist.is_initialized()):
            return decision
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        agreed = torch.tensor(decision, device=device)
        dist.broadcast(agreed, src=0)
        return tuple(int(value) for value in agreed.tolist())
