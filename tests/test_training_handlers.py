"""Checkpoints, resuming, stopping on a signal and progress lines, on real MONAI engines with a tiny
network. Signals are real: the test process sends them to itself while the trainer runs."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Activationsd, AsDiscreted, Compose, RandFlipd, RandGaussianNoised

from pipeline.inference.runtimes import RuntimeNetwork
from pipeline.io.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.training import ProgressLogger, TrainingCheckpoints
from pipeline.training.interrupt import last_interruption
from pipeline.training.progress import format_seconds

AUGMENTATION = Compose(
    [RandFlipd(["image", "label"], prob=0.5, spatial_axis=0), RandGaussianNoised("image", prob=0.5)]
)


def build_trainer(
    ckpt_dir: Path,
    max_epochs: int,
    channels: int = 2,
    cases: int = 4,
    augment: bool = False,
    amp: bool = False,
    lr: float = 0.05,
    cosine: bool = False,
    every_minutes: float | None = None,
) -> tuple[SupervisedTrainer, SupervisedEvaluator]:
    """Two cases per iteration; ``augment`` adds random transforms and shuffling, whose generators a
    resumed run must continue rather than restart; ``cosine``: train.yaml's warm-up cosine schedule."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    data = [
        {
            "image": torch.randn(1, 6, 6, 6, generator=generator),
            "label": torch.randint(0, 2, (1, 6, 6, 6), generator=generator),
        }
        for _ in range(cases)
    ]
    network = torch.nn.Conv3d(1, channels, 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    scheduler = (
        WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=max_epochs, warmup_multiplier=0.1)
        if cosine
        else torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    )
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
    train_data = Dataset(data, AUGMENTATION) if augment else data
    handlers = [
        LrScheduleHandler(scheduler, print_lr=False),
        ValidationHandler(validator=validator, interval=1, epoch_level=True),
        TrainingCheckpoints(ckpt_dir, network, optimizer, scheduler, validator, every_minutes=every_minutes),
        ProgressLogger(every=1, optimizer=optimizer),
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(train_data, batch_size=2, shuffle=augment),
        network=network,
        optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=handlers,
        amp=amp,
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
    with pytest.raises(CheckpointError, match=r"latest\.pt does not fit .* 2x1x1x1x1 .* and 3x1x1x1x1"):
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
    with pytest.raises(CheckpointError, match=r"checkpoint \S*model\.pt is truncated or not a checkpoint"):
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


def signal_during(trainer: SupervisedTrainer, iteration: int, signum: int) -> list[object]:
    """Send ``signum`` to this process while ``iteration`` runs; returns the handler that each
    later iteration found installed for it (the operating system's default after the first)."""
    found: list[object] = []
    trainer.add_event_handler(
        Events.ITERATION_STARTED(once=iteration), lambda _: os.kill(os.getpid(), signum)
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(event_filter=lambda _, i: i > iteration),
        lambda _: found.append(signal.getsignal(signum)),
    )
    return found


@pytest.mark.own_process
def test_sigterm_mid_epoch_stops_after_the_iteration_and_resumes_there(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    trainer, _ = build_trainer(tmp_path, max_epochs=3, cases=8)  # 4 iterations per epoch
    signal_during(trainer, 6, signal.SIGTERM)
    trainer.run()
    assert (
        trainer.state.iteration == 6 and load_checkpoint(tmp_path / "latest.pt")["trainer"]["iteration"] == 6
    )
    stopped = last_interruption()
    assert stopped is not None and stopped.exit_status == 143 and stopped.iteration == 6
    assert signal.getsignal(signal.SIGTERM) is before, "the process's own handler is back after the run"

    again, _ = build_trainer(tmp_path, max_epochs=3, cases=8)
    iterations = count_iterations(again)
    again.run()
    assert iterations == list(range(7, 13)), "the rest of epoch 2, then epoch 3"
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**3), "one step per epoch"
    assert last_interruption() is None


@pytest.mark.own_process
def test_a_signal_in_an_epochs_last_iteration_lets_the_epoch_end(tmp_path: Path) -> None:
    trainer, validator = build_trainer(tmp_path, max_epochs=3)  # 2 iterations per epoch
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job (nohup)
    found = signal_during(trainer, 2, signal.SIGINT)
    trainer.run()
    assert trainer.state.iteration == 2 and validator.state.epoch == 1, "validated before stopping"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9)
    assert load_checkpoint(tmp_path / "latest.pt")["trainer"]["iteration"] == 2
    assert last_interruption().exit_status == 130
    assert found == [], "no iteration ran after it"
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.own_process
def test_after_the_first_signal_a_second_one_kills_at_once(tmp_path: Path) -> None:
    trainer, _ = build_trainer(tmp_path, max_epochs=2, cases=8)
    found = signal_during(trainer, 1, signal.SIGTERM)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=1), lambda _: found.append(signal.getsignal(signal.SIGINT))
    )
    trainer.run()
    assert found == [signal.SIG_DFL], "SIGINT too is left to the operating system: no Python code delays it"


@pytest.mark.long  # a fresh interpreter for each runtime
@pytest.mark.own_process
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_sigterm_after_a_cpu_runtime_segmented_in_this_process_still_checkpoints(
    tmp_path: Path, runtime: str
) -> None:
    """A notebook segments with ONNX Runtime or OpenVINO, then trains: the runtime's thread pools must
    leave SIGTERM to the training (a checkpoint, then the stop), not end or crash the process."""
    pytest.importorskip(runtime, reason=f"the {runtime} package is not installed")
    network = torch.nn.Conv3d(1, 2, 1).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    segmenter = RuntimeNetwork(network, runtime, tmp_path / "model.pt")
    with torch.no_grad():
        segmenter(torch.randn(2, 1, 8, 8, 8))
    assert segmenter._runs[(1, 8, 8, 8)] is not None, f"the windows ran on {runtime}, not on PyTorch"

    trainer, _ = build_trainer(tmp_path / "run", max_epochs=2, cases=8)
    signal_during(trainer, 2, signal.SIGTERM)
    trainer.run()
    assert trainer.state.iteration == 2
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["trainer"]["iteration"] == 2
    assert last_interruption().exit_status == 143


def test_an_error_during_training_gives_the_signals_back(tmp_path: Path) -> None:
    trainer, _ = build_trainer(tmp_path, max_epochs=2)

    def fail(_: object) -> None:
        raise ValueError("broken batch")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), fail)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job (nohup)
    with pytest.raises(ValueError, match="broken batch"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """Shuffling, random transforms and noise continue from their saved states: the weights after
    1 epoch + resume + 2 epochs are bit for bit those of 3 epochs in one go."""
    straight, _ = build_trainer(tmp_path / "straight", max_epochs=3, cases=6, augment=True)
    straight.run()
    first, _ = build_trainer(tmp_path / "resumed", max_epochs=1, cases=6, augment=True)
    first.run()
    rng = load_checkpoint(tmp_path / "resumed" / "latest.pt")["rng"]
    assert {"torch", "numpy", "python", "transforms"} <= set(rng) and len(rng["transforms"]) >= 2
    resumed, _ = build_trainer(tmp_path / "resumed", max_epochs=3, cases=6, augment=True)
    resumed.run()
    for name, value in straight.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[name]), name


def test_the_amp_loss_scale_is_saved_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI makes a CUDA GradScaler when a run starts with amp; on this CPU, a CPU one stands in."""
    scales = iter([512.0, 2.0])
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu", next(scales)))
    trainer, _ = build_trainer(tmp_path, max_epochs=1, amp=True)
    trainer.run()
    saved = load_checkpoint(tmp_path / "latest.pt")["scaler"]["scale"]
    again, _ = build_trainer(tmp_path, max_epochs=2, amp=True)
    again.run()
    assert saved == 512.0 and again.scaler.get_scale() == 512.0, "the resumed run keeps the saved scale"


def test_a_long_epoch_is_checkpointed_on_the_wall_clock(tmp_path: Path) -> None:
    """``every_minutes`` saves within the epoch (0: after every iteration), so a SIGKILL in the middle
    of a long first epoch still leaves a checkpoint to resume from."""
    trainer, _ = build_trainer(tmp_path, max_epochs=1, cases=8, every_minutes=0)  # 4 iterations
    saved: list[int] = []
    trainer.add_event_handler(  # before iteration 4: the save at iteration 3's end is on disk
        Events.ITERATION_STARTED(once=4),
        lambda _: saved.append(load_checkpoint(tmp_path / "latest.pt")["trainer"]["iteration"]),
    )
    trainer.run()
    assert saved == [3]


def test_a_resume_with_more_epochs_and_another_learning_rate_follows_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished 10-epoch warm-up cosine run extended to 20 epochs with half the learning rate: the
    schedule ends at epoch 20 at the new rate, going down from where it stood, never climbing back."""
    build_trainer(tmp_path, max_epochs=10, lr=1e-3, cosine=True)[0].run()
    trainer, _ = build_trainer(tmp_path, max_epochs=20, lr=5e-4, cosine=True)
    rates: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: rates.append(e.optimizer.param_groups[0]["lr"]))
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpoints"):
        trainer.run()
    assert len(rates) == 10 and rates == sorted(rates, reverse=True), rates
    expected = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1)], lr=5e-4), 2, 20, warmup_multiplier=0.1)
    assert rates[0] == pytest.approx(5e-4 * expected.lr_lambda(10)) and rates[-1] < 5e-5
    assert "learning rate 0.001 -> 0.0005" in caplog.text and "schedule length 10 -> 20" in caplog.text
