"""Latest-state and best-model checkpoints, resuming from them, and stopping on a signal, as one
ignite handler.

MONAI's CheckpointSaver/CheckpointLoader pair cannot do this alone: the loader needs a file
that does not exist on the first run, and after a restart the saver has forgotten the best
metric, so a resumed run would overwrite the best model with its first (maybe worse)
validation. Here the best metric travels inside the latest checkpoint, with everything else a
resumed run needs to continue as if never stopped: optimiser, scheduler, AMP scaler, epoch and
iteration, and the random generators' states.

A kill at any moment loses at most the current epoch: ``latest.pt`` is rewritten atomically at
the end of every epoch, as the epoch's last step (after validation and after the MLflow record,
so the record never lags behind the checkpoint), and within a long epoch every ``every_minutes``
of wall-clock time. SIGINT/SIGTERM stop after the current iteration with a checkpoint of that
iteration; ignite resumes mid-epoch from it (``Engine.load_state_dict`` with an iteration inside an
epoch runs the epoch's remaining iterations on a fresh pass of the data loader).

The run folder is locked and checked against the dataset first (``run_folder.py``). A resume with
more epochs re-targets the learning-rate schedule to the new length from the step where it stands,
and optimiser settings given anew (learning rate, weight decay) apply, each change logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from pipeline.io.checkpoint import (
    CONFIG_KEY,
    DATASET_KEY,
    CheckpointError,
    load_checkpoint,
    load_weights,
    model_state,
    save_atomic,
    unwrap,
)
from pipeline.training import rng
from pipeline.training.distributed import is_main_process
from pipeline.training.interrupt import Interruption, SignalStop, record
from pipeline.training.run_folder import (
    BEST_FILE,
    LATEST_FILE,
    lock_run_folder,
    release_run_folder,
    remove_stale_temporaries,
    require_same_dataset,
)

logger = logging.getLogger(__name__)

# Fired on the trainer just before a mid-epoch ``latest.pt``: handlers that buffer (the MLflow record)
# send what the checkpoint covers, so a resume from it leaves no gap in their series.
SAVING_MID_EPOCH = "saving_mid_epoch"


class TrainingCheckpoints:
    """Save the latest training state every epoch and the best network on every new best metric
    (rank 0 only under torchrun; every rank resumes); stop cleanly on SIGINT/SIGTERM.

    On start, lock ``ckpt_dir`` and resume from ``latest.pt`` there if it exists. A finished run
    resumed with more epochs simply continues. ``dataset`` (``pipeline.data.datalist.dataset_facts``)
    goes into every checkpoint, so ``model.pt`` describes itself, and so does ``config``: the config keys
    inference needs (the plan's, the network and preprocessing overrides); ``every_minutes`` also saves
    ``latest.pt`` within an epoch, so a SIGKILL loses at most that much training.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: object | None = None,
        validator: Engine | None = None,
        map_location: str | torch.device = "cpu",
        stop_on_signals: bool = True,
        dataset: Mapping[str, Any] | None = None,
        every_minutes: float | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.map_location = map_location
        self.signals = SignalStop() if stop_on_signals else None
        self.dataset = dict(dataset) if dataset else None
        self.config = dict(config) if config else None
        self.every_seconds = None if every_minutes is None else float(every_minutes) * 60.0
        self._saved_iteration = -1
        self._saved_at = time.monotonic()

    @property
    def latest_path(self) -> Path:
        return self.ckpt_dir / LATEST_FILE

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / BEST_FILE

    def attach(self, trainer: Engine) -> None:
        trainer.register_events(SAVING_MID_EPOCH)
        trainer.add_event_handler(Events.STARTED, self.start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.stop_if_signalled)
        trainer.add_event_handler(Events.COMPLETED, self.complete)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self.restore_and_raise)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best_if_improved)

    def start(self, trainer: Engine) -> None:
        """Resume, then register the saving handlers: registered now, after every other handler was
        attached, they run last in their events, so an epoch's checkpoint covers all of its work."""
        record(None)
        if is_main_process():
            lock_run_folder(self.ckpt_dir)  # already held when train.yaml's initialize claimed it
            remove_stale_temporaries(self.ckpt_dir)
        self.resume(trainer)
        self._saved_at = time.monotonic()
        if not trainer.has_event_handler(self.end_epoch, Events.EPOCH_COMPLETED):
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self.end_epoch)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self.save_if_due)
            trainer.add_event_handler(Events.TERMINATE, self.save_on_terminate)
        if self.signals is not None:
            self.signals.install()

    @property
    def signalled(self) -> int | None:
        return self.signals.received if self.signals is not None else None

    def stop_if_signalled(self, trainer: Engine) -> None:
        """Stop after this iteration; at an epoch's last one, after the epoch (validation, schedule)."""
        if self.signalled is not None and trainer.state.iteration % trainer.state.epoch_length:
            trainer.terminate()

    def save_if_due(self, trainer: Engine) -> None:
        """Within an epoch, save every ``every_minutes`` (an epoch's end saves anyway)."""
        due = self.every_seconds is not None and time.monotonic() - self._saved_at >= self.every_seconds
        if due and trainer.state.iteration % trainer.state.epoch_length and self.signalled is None:
            trainer.fire_event(SAVING_MID_EPOCH)  # the MLflow record catches up first, as at an epoch's end
            self.save_latest(trainer)
            logger.info("saved %s mid-epoch, at iteration %d", self.latest_path, trainer.state.iteration)

    def end_epoch(self, trainer: Engine) -> None:
        self.save_latest(trainer)
        if self.signalled is not None:
            trainer.terminate()

    def save_on_terminate(self, trainer: Engine) -> None:
        if trainer.state.iteration != self._saved_iteration:
            self.save_latest(trainer)
        if self.signalled is not None:
            state = trainer.state
            stop = Interruption(self.signalled, state.epoch, state.iteration, self.latest_path)
            record(stop)
            logger.warning("training %s", stop)

    def complete(self, trainer: Engine) -> None:
        if self.signalled is None:
            self.ensure_model_saved(trainer)
        self.restore_signals()

    def restore_signals(self) -> None:
        """The run is over: the signals go back to their previous handlers, the run folder's lock too."""
        if self.signals is not None:
            self.signals.restore()
        release_run_folder(self.ckpt_dir)

    def restore_and_raise(self, _: Engine, error: BaseException) -> None:
        """ignite re-raises only when no EXCEPTION_RAISED handler exists: give the signals back, re-raise."""
        self.restore_signals()
        raise error

    def _stateful(self) -> dict[str, Any]:
        objects = {"network": unwrap(self.network), "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        return objects

    def save_latest(self, trainer: Engine) -> None:
        if not is_main_process():
            return
        state = {name: obj.state_dict() for name, obj in self._stateful().items()}
        state["trainer"] = trainer.state_dict()
        scaler = getattr(trainer, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # AMP's loss scale (disabled without a GPU)
            state["scaler"] = scaler.state_dict()
        state["rng"] = rng.capture(getattr(trainer, "data_loader", None))
        if self.dataset is not None:
            state[DATASET_KEY] = self.dataset
        if self.config is not None:
            state[CONFIG_KEY] = self.config
        if self.validator is not None:
            state["best_metric"] = float(self.validator.state.best_metric)
            state["best_metric_epoch"] = int(self.validator.state.best_metric_epoch)
        save_atomic(state, self.latest_path)
        self._saved_iteration = trainer.state.iteration
        self._saved_at = time.monotonic()

    def save_model(self) -> None:
        """``model.pt``: the bare network (unwrapped) with the dataset facts and config that describe it."""
        save_atomic(model_state(unwrap(self.network).state_dict(), self.dataset, self.config), self.best_path)

    def save_best_if_improved(self, validator: Engine) -> None:
        if is_main_process() and validator.state.best_metric_epoch == validator.state.epoch:
            self.save_model()
            logger.info(
                "new best %s %.4f at epoch %d, saved %s",
                validator.state.key_metric_name,
                validator.state.best_metric,
                validator.state.epoch,
                self.best_path,
            )

    def ensure_model_saved(self, trainer: Engine) -> None:
        """A run too short to validate still leaves a model.pt for inference: its final network."""
        if is_main_process() and not self.best_path.exists():
            logger.warning("no validation ran; saving the final network as %s", self.best_path)
            self.save_model()

    def resume(self, trainer: Engine) -> None:
        if not self.latest_path.exists():
            return
        checkpoint = load_checkpoint(self.latest_path, self.map_location)
        for name in ("trainer", *self._stateful()):
            if name not in checkpoint:
                raise CheckpointError(
                    f"checkpoint {self.latest_path} has no '{name}' state: not a training state of this "
                    "pipeline (model.pt files hold weights only)"
                )
        if self.dataset is not None:
            require_same_dataset(
                self.latest_path, checkpoint.get(DATASET_KEY), self.dataset, "this run's datalist"
            )
        load_weights(self.network, checkpoint["network"], self.latest_path)  # unwrapped there
        configured = [
            {k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups
        ]
        base_lrs = _base_lrs(self.optimizer, self.lr_scheduler)
        for name, obj in self._stateful().items():
            if name != "network":
                self._load_state(name, obj, checkpoint[name])
        scaler = getattr(trainer, "scaler", None)
        if scaler is not None and scaler.is_enabled() and "scaler" in checkpoint:
            self._load_state("scaler", scaler, checkpoint["scaler"])
        self._restore_progress(trainer, checkpoint)
        self._apply_configuration(configured, base_lrs, checkpoint["trainer"].get("max_epochs"), trainer)
        if "rng" in checkpoint:
            rng.restore(checkpoint["rng"], getattr(trainer, "data_loader", None))

    def _load_state(self, name: str, obj: Any, state: Any) -> None:
        try:
            obj.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            detail = str(error).splitlines()[0]
            raise CheckpointError(
                f"checkpoint {self.latest_path}: its {name} state does not fit this bundle's ({detail})"
            ) from None

    def _restore_progress(self, trainer: Engine, checkpoint: dict) -> None:
        requested_epochs = trainer.state.max_epochs
        trainer.load_state_dict(checkpoint["trainer"])
        trainer.state.max_epochs = max(requested_epochs, trainer.state.epoch)
        self._saved_iteration = trainer.state.iteration
        if self.validator is not None and "best_metric" in checkpoint:
            self.validator.state.best_metric = checkpoint["best_metric"]
            self.validator.state.best_metric_epoch = checkpoint["best_metric_epoch"]
        logger.info("resumed from %s: %s", self.latest_path, _position(trainer.state))

    def _apply_configuration(
        self, configured: list[dict], base_lrs: list[float], saved_epochs: int | None, trainer: Engine
    ) -> None:
        """What this run was configured with wins over the checkpoint's copy of it: optimiser settings
        (weight decay, betas) and the learning rate, each change logged; with another number of
        epochs the schedule (``t_total`` of MONAI's warm-up schedules) ends at the new last epoch,
        going on from the step where it stands. The learning rate is then that of the new schedule."""
        changes = []
        for group, wanted in zip(self.optimizer.param_groups, configured, strict=True):
            for key, value in wanted.items():
                if key not in ("lr", "initial_lr") and group.get(key) != value:
                    changes.append(f"{key} {group.get(key)} -> {value}")
                    group[key] = value
        saved_lrs = _base_lrs(self.optimizer, self.lr_scheduler)
        if saved_lrs != base_lrs:
            changes.append(f"learning rate {_floats(saved_lrs)} -> {_floats(base_lrs)}")
        scheduler, epochs = self.lr_scheduler, trainer.state.max_epochs
        retarget = hasattr(scheduler, "t_total") and saved_epochs != epochs and scheduler.t_total != epochs
        if retarget:
            changes.append(f"schedule length {scheduler.t_total} -> {epochs} epochs")
            scheduler.t_total = epochs
        if retarget or saved_lrs != base_lrs:
            self._set_learning_rates(base_lrs, saved_lrs)
        if changes:
            now = _floats([group["lr"] for group in self.optimizer.param_groups])
            logger.warning("resumed with changed settings: %s; learning rate now %s", "; ".join(changes), now)

    def _set_learning_rates(self, base_lrs: list[float], saved_lrs: list[float]) -> None:
        """Each group's learning rate for the step the schedule stands at, from the new base rates."""
        scheduler, groups = self.lr_scheduler, self.optimizer.param_groups
        if scheduler is None:
            for group, lr in zip(groups, base_lrs, strict=True):
                group["lr"] = lr
            return
        scheduler.base_lrs = list(base_lrs)
        factors = getattr(scheduler, "lr_lambdas", None)  # LambdaLR (MONAI's warm-up schedules)
        for index, group in enumerate(groups):
            group["initial_lr"] = base_lrs[index]
            if factors is not None:
                group["lr"] = base_lrs[index] * factors[index](scheduler.last_epoch)
            elif saved_lrs[index]:  # another schedule: scaled as its base rate was
                group["lr"] *= base_lrs[index] / saved_lrs[index]
        scheduler._last_lr = [group["lr"] for group in groups]


def _base_lrs(optimizer: torch.optim.Optimizer, scheduler: object | None) -> list[float]:
    """The learning rates a schedule scales (its ``base_lrs``; the groups' own without one)."""
    rates = getattr(scheduler, "base_lrs", None)
    return (
        list(rates) if rates else [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    )


def _floats(values: list[float]) -> str:
    return ",".join(f"{value:.3g}" for value in values)


def _position(state: Any) -> str:
    """Where a resumed run goes on, in a user's words (epochs and iterations counted from 1)."""
    within = state.iteration % state.epoch_length
    if state.epoch >= state.max_epochs:
        return f"all {state.max_epochs} epochs were done"
    step = f", iteration {within + 1} of {state.epoch_length}" if within else ""
    return f"going on with epoch {state.epoch + 1} of {state.max_epochs}{step}"
