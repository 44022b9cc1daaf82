"""Latest-state and best-model checkpoints, and resuming from them, as one ignite handler.

MONAI's CheckpointSaver/CheckpointLoader pair cannot do this alone: the loader needs a file
that does not exist on the first run, and after a restart the saver has forgotten the best
metric, so a resumed run would overwrite the best model with its first (maybe worse)
validation. Here the best metric travels inside the latest checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from pipeline.io.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.training.distributed import is_main_process

logger = logging.getLogger(__name__)

LATEST_FILE = "latest.pt"
BEST_FILE = "model.pt"  # the model zoo's name: a bare network state_dict


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network under DistributedDataParallel/DataParallel, so checkpoints load anywhere."""
    return getattr(network, "module", network)


class TrainingCheckpoints:
    """Save the latest training state every epoch and the best network on every new best metric
    (rank 0 only under torchrun; every rank resumes).

    On start, resume from ``latest.pt`` in ``ckpt_dir`` if it exists: network, optimiser,
    scheduler, epoch/iteration and the best metric so far. A finished run resumed with more
    epochs simply continues.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: object | None = None,
        validator: Engine | None = None,
        map_location: str | torch.device = "cpu",
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.map_location = map_location

    @property
    def latest_path(self) -> Path:
        return self.ckpt_dir / LATEST_FILE

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / BEST_FILE

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.resume)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save_latest)
        trainer.add_event_handler(Events.COMPLETED, self.ensure_model_saved)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best_if_improved)

    def _stateful(self) -> dict[str, object]:
        objects = {"network": unwrap(self.network), "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        return objects

    def save_latest(self, trainer: Engine) -> None:
        if not is_main_process():
            return
        state = {name: obj.state_dict() for name, obj in self._stateful().items()}
        state["trainer"] = trainer.state_dict()
        if self.validator is not None:
            state["best_metric"] = float(self.validator.state.best_metric)
            state["best_metric_epoch"] = int(self.validator.state.best_metric_epoch)
        save_atomic(state, self.latest_path)

    def save_best_if_improved(self, validator: Engine) -> None:
        if is_main_process() and validator.state.best_metric_epoch == validator.state.epoch:
            save_atomic(unwrap(self.network).state_dict(), self.best_path)
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
            save_atomic(unwrap(self.network).state_dict(), self.best_path)

    def resume(self, trainer: Engine) -> None:
        if not self.latest_path.exists():
            return
        checkpoint = load_checkpoint(self.latest_path, self.map_location)
        for name, obj in self._stateful().items():
            if name not in checkpoint:
                raise CheckpointError(f"checkpoint {self.latest_path} has no '{name}' state")
            try:
                obj.load_state_dict(checkpoint[name])
            except (RuntimeError, ValueError, KeyError) as error:
                raise CheckpointError(
                    f"checkpoint {self.latest_path}: its {name} does not match this bundle's ({error})"
                ) from None
        self._restore_progress(trainer, checkpoint)

    def _restore_progress(self, trainer: Engine, checkpoint: dict) -> None:
        requested_epochs = trainer.state.max_epochs
        trainer.load_state_dict(checkpoint["trainer"])
        trainer.state.max_epochs = max(requested_epochs, trainer.state.epoch)
        if self.validator is not None and "best_metric" in checkpoint:
            self.validator.state.best_metric = checkpoint["best_metric"]
            self.validator.state.best_metric_epoch = checkpoint["best_metric_epoch"]
        logger.info(
            "resumed from %s at epoch %d of %d",
            self.latest_path,
            trainer.state.epoch,
            trainer.state.max_epochs,
        )
