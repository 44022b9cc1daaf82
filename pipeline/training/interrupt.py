"""Ctrl-C and SIGTERM (a scheduler's pre-emption, ``kill``) stop training cleanly: the current
iteration finishes, a checkpoint is written (``TrainingCheckpoints``), and a rerun resumes there.

A second signal aborts at once: the first one gives the signals back to the operating system's
default action, so even a long operation inside the network cannot delay it (the checkpoint on
disk is the previous complete one; atomic writes never leave half a file under its name).

A scheduler (``timeout``, SLURM, Kubernetes, ``docker stop``) and a terminal's Ctrl-C signal the
whole process group, DataLoader workers included: a worker that died of it would end the run with
"DataLoader worker is killed by signal" before the checkpoint. Workers therefore ignore both
(``worker_init_fn``) and leave the stop to the main process.

Only the only process of a run listens: under torchrun the ranks would have to agree on the
iteration to stop at, so a multi-GPU run keeps the default (it resumes from its last epoch).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from monai.data.utils import worker_init_fn as seed_worker

from pipeline.training.distributed import is_distributed

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Interruption:
    """Where a training stopped on a signal, and the checkpoint that holds it."""

    signum: int
    epoch: int
    iteration: int
    checkpoint: Path

    @property
    def exit_status(self) -> int:
        """The shell's convention for "ended by signal N": 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return (
            f"interrupted by {signal.Signals(self.signum).name} in epoch {self.epoch}, after iteration "
            f"{self.iteration}; {self.checkpoint} holds it: run the same command again to resume"
        )


class TrainingInterrupted(Exception):
    """Raised by ``pipeline.workflows.train`` after a training stopped on a signal (checkpoint written)."""

    def __init__(self, interruption: Interruption) -> None:
        super().__init__(str(interruption))
        self.interruption = interruption


_last: Interruption | None = None  # signals are per process, and so is this record


def last_interruption() -> Interruption | None:
    """The interruption of the latest training run in this process, None if it was not interrupted."""
    return _last


def record(interruption: Interruption | None) -> None:
    global _last
    _last = interruption


class SignalStop:
    """Remembers the first SIGINT/SIGTERM instead of dying; the trainer asks ``received`` after each
    iteration. Installed for one run and restored after it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.received = None
        if is_distributed() or threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _: FrameType | None) -> None:
        self.received = signum
        for each in SIGNALS:
            signal.signal(each, signal.SIG_DFL)  # the next one is not caught: it ends the process at once
        logger.warning(
            "%s received: finishing the current iteration, then saving a checkpoint "
            "(send it again to abort at once, losing the epoch)",
            signal.Signals(signum).name,
        )


def worker_init_fn(worker_id: int) -> None:
    """A DataLoader worker's start: MONAI's seeding of its random transforms, and SIGINT/SIGTERM
    ignored, so that a signal to the process group stops the run through the main process only (the
    worker still ends with it: PyTorch's workers exit when their parent is gone or done)."""
    seed_worker(worker_id)
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
