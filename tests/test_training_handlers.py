"""Checkpoints, resuming and progress lines, on real MONAI engines with a tiny network."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.losses import DiceCELoss
from monai.transforms import Activationsd, AsDiscreted, Compose

from pipeline.io.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.training import ProgressLogger, TrainingCheckpoints
from pipeline.training.progress import format_seconds


def build_trainer(
    ckpt_dir: Path, max_epochs: int, channels: int = 2
) -> tuple[SupervisedTrainer, SupervisedEvaluator]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    data = [
        {
            "image": torch.randn(1, 6, 6, 6, generator=generator),
            "label": torch.randint(0, 2, (1, 6, 6, 6), generator=generator),
        }
        for _ in range(4)
    ]
    network = torch.nn.Conv3d(1, channels, 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    validator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data[:2], batch_size=1),
        network=network,
        postprocessing=Compose(
            [
                Activationsd(keys="pred", softmax=True),
                AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=channels),
            ]
        ),
        key_val_metric={
            "val_mean_dice": MeanDice(
                include_background=False, output_transform=from_engine(["pred", "label"])
            )
        },
    )
    handlers = [
        LrScheduleHandler(scheduler, print_lr=False),
        ValidationHandler(validator=validator, interval=1, epoch_level=True),
        TrainingCheckpoints(ckpt_dir, network, optimizer, scheduler, validator),
        ProgressLogger(every=1, optimizer=optimizer),
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=2),
        network=network,
        optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=handlers,
    )
    return trainer, validator


def count_iterations(trainer: SupervisedTrainer) -> list[int]:
    seen: list[int] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.iteration))
    return seen


def test_rerun_resumes_where_the_last_run_stopped(tmp_path: Path) -> None:
    first, _ = build_trainer(tmp_path, max_epochs=2)
    first.run()
    latest = load_checkpoint(tmp_path / "latest.pt")
    assert latest["trainer"]["iteration"] == 4 and (tmp_path / "model.pt").is_file()
    assert {"network", "optimizer", "lr_scheduler", "best_metric"} <= set(latest)

    second, validator = build_trainer(tmp_path, max_epochs=4)
    iterations = count_iterations(second)
    second.run()
    assert second.state.epoch == 4
    assert iterations == [5, 6, 7, 8], "only epochs 3 and 4 run again"
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**4)
    assert validator.state.best_metric >= latest["best_metric"]


def test_a_resumed_run_keeps_a_better_earlier_best_model(tmp_path: Path) -> None:
    build_trainer(tmp_path, max_epochs=1)[0].run()
    latest = load_checkpoint(tmp_path / "latest.pt")
    latest["best_metric"] = 2.0  # better than any Dice: nothing later may replace the best model
    save_atomic(latest, tmp_path / "latest.pt")
    best_before = (tmp_path / "model.pt").read_bytes()
    build_trainer(tmp_path, max_epochs=3)[0].run()
    assert (tmp_path / "model.pt").read_bytes() == best_before


def test_resuming_a_different_network_names_the_checkpoint(tmp_path: Path) -> None:
    build_trainer(tmp_path, max_epochs=1)[0].run()
    trainer, _ = build_trainer(tmp_path, max_epochs=2, channels=3)
    with pytest.raises(CheckpointError, match=r"latest\.pt.*network does not match"):
        trainer.run()


def test_failed_save_leaves_the_previous_checkpoint_and_no_debris(tmp_path: Path) -> None:
    target = save_atomic({"epoch": 1}, tmp_path / "latest.pt")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_atomic({"epoch": 2, "unpicklable": lambda: None}, target)
    assert load_checkpoint(target) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    target = save_atomic({"weights": torch.zeros(1000)}, tmp_path / "model.pt")
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.pt cannot be read"):
        load_checkpoint(target)


def test_progress_lines_show_epoch_iteration_loss_and_time_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, _ = build_trainer(tmp_path, max_epochs=2)
    with caplog.at_level(logging.INFO, logger="medseg.train"):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.train"]
    assert lines[0].startswith("epoch 1/2  iter 1/2  loss ") and "left" in lines[0]
    assert any(line.startswith("epoch 2/2 done in") for line in lines)
    assert format_seconds(3725) == "1h02m05s" and format_seconds(float("nan")) == "?"
