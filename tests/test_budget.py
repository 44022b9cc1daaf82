"""The time budget, the last epoch's validation, the progress estimate and the data-loader workers:
tiny real trainings of the unet3d bundle's own config, and bare ignite engines where the step time
must be known (a sleep gives a lower bound on it, never an exact timing)."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.optimizers import WarmupCosineSchedule

from pipeline.io.checkpoint import load_checkpoint
from pipeline.training import ProgressLogger, TimeBudget, ValidationHandler
from pipeline.training.budget import epoch_length
from pipeline.training.distributed import data_loader_workers
from pipeline.workflows import bundle_dir, config_files, meta_files


def bundle_config(workflow: str, **settings: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(meta_files("unet3d"))
    parser.read_config(config_files("unet3d", workflow))
    parser.update({**tiny("unet3d"), "bundle_root": str(bundle_dir("unet3d")), **settings})
    return parser


def train(datalist: Path, folder: Path, **settings: object) -> dict:
    """The unet3d bundle's training, in this process as ``monai.bundle run`` runs it (no tracking);
    returns the trainer and the epochs its validator ran at."""
    parser = bundle_config(
        "train", datalist=str(datalist), ckpt_dir=str(folder), output_dir=str(folder), **settings
    )
    validated: list[int] = []
    validator = parser.get_parsed_content("validate::evaluator")
    validator.add_event_handler(Events.COMPLETED, lambda engine: validated.append(engine.state.epoch))
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train::trainer")
    iterations: list[int] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration)
    )
    try:
        trainer.run()
    finally:
        parser.get_parsed_content("finalize")
    return {"trainer": trainer, "validated": validated, "iterations": iterations, "validator": validator}


def test_the_last_epoch_validates_when_the_interval_skips_it(phantom_datalist: Path, tmp_path: Path) -> None:
    run = train(phantom_datalist, tmp_path, max_epochs=3, val_interval=2)
    assert run["validated"] == [2, 3], "every second epoch, and the last"
    assert load_checkpoint(tmp_path / "latest.pt")["best_metric_epoch"] in (2, 3)


def test_a_budget_shorter_than_an_epoch_ends_that_epoch_with_a_validated_model(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    """An epoch of a million iterations and a 3-second budget: the epoch is cut, becomes the last, is
    validated and gives model.pt; a rerun resumes inside it and is cut again, validated again."""
    settings = {"iterations_per_epoch": 10**6, "time_budget_minutes": 0.05}
    first = train(phantom_datalist, tmp_path, **settings)
    state = first["trainer"].state
    assert state.epoch == state.max_epochs == 1 and 0 < state.iteration < 10**6
    assert first["validated"] == [1] and first["validator"].state.best_metric_epoch == 1
    assert (tmp_path / "model.pt").is_file()
    latest = load_checkpoint(tmp_path / "latest.pt")
    assert latest["trainer"]["epoch_length"] == 10**6 and latest["trainer"]["iteration"] == state.iteration

    again = train(phantom_datalist, tmp_path, **settings)
    assert again["iterations"][0] == state.iteration + 1, "it goes on inside the cut epoch"
    assert again["validated"] == [1] and again["trainer"].state.max_epochs == 1


def test_the_budget_chooses_short_epochs_and_fits_the_schedule_to_them() -> None:
    """Steps of at least 20 ms and a 1 s budget: an epoch trains for at most a tenth of it (5 steps),
    not the loader's 1000, and the schedule ends with the last epoch inside the budget."""
    schedule = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 1, 1000)
    trainer = Engine(lambda engine, batch: time.sleep(0.02))
    TimeBudget(minutes=1 / 60, lr_scheduler=schedule).attach(trainer)
    trainer.run(list(range(1000)), max_epochs=1000)
    state = trainer.state
    assert 1 <= state.epoch_length <= 5
    assert state.iteration < 1000 and state.epoch == state.max_epochs == schedule.t_total >= 2


def test_an_epoch_of_a_small_dataset_spans_several_passes_of_its_loader() -> None:
    """Six items and steps of 20 ms in a 2 s budget: an epoch is a tenth of the budget (about 10 steps),
    not one pass of 6, so validation does not follow every sixth step."""
    trainer = Engine(lambda engine, batch: time.sleep(0.02))
    TimeBudget(minutes=2 / 60).attach(trainer)
    trainer.run(list(range(6)), max_epochs=1000)
    assert trainer.state.epoch_length > 6, "longer than one pass of the six items"
    assert trainer.state.epoch == trainer.state.max_epochs < 1000, "the budget ended it, not the cap"


def test_an_explicit_epoch_length_is_kept() -> None:
    """``iterations_per_epoch`` 30 is kept where the budget would have chosen at most 5."""
    trainer = Engine(lambda engine, batch: time.sleep(0.02))
    TimeBudget(minutes=1 / 60, iterations_per_epoch=30).attach(trainer)
    trainer.run(list(range(100)), max_epochs=1000, epoch_length=30)
    assert trainer.state.epoch_length == 30 and trainer.state.epoch == trainer.state.max_epochs


def test_iterations_per_epoch_is_checked() -> None:
    assert epoch_length(None) is None and epoch_length(80) == 80
    for wrong in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="iterations_per_epoch must be a positive whole number"):
            epoch_length(wrong)


def test_the_time_left_never_exceeds_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    """A million epochs planned and a 10-minute budget: the estimate is the budget's time left, not
    the projection of a million epochs."""
    budget = TimeBudget(minutes=10)
    trainer = Engine(lambda engine, batch: [{"loss": 0.5}])  # as SupervisedTrainer gives it
    budget.attach(trainer)
    ProgressLogger(every=1, budget=budget).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda engine: engine.terminate())
    with caplog.at_level(logging.INFO, logger="medseg.train"):
        trainer.run(list(range(1000)), max_epochs=10**6)
    lefts = re.findall(r"~(?:(\d+)h)?(\d+)m(\d+)s left", caplog.text)
    assert len(lefts) == 3
    assert all(int(h or 0) == 0 and int(m) * 60 + int(s) <= 600 for h, m, s in lefts), caplog.text


def test_data_loader_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [data_loader_workers(cores) for cores in (1, 2, 3, 4, 16, 64)] == [0, 0, 2, 3, 8, 8]
    cores = len(os.sched_getaffinity(0))
    assert bundle_config("train").get_parsed_content("num_workers") == data_loader_workers(cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the node's cores shared by two processes
    assert data_loader_workers() == data_loader_workers(cores // 2)


class _SlowNetwork(torch.nn.Module):
    """A validation that takes at least 0.1 s a case (two cases)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        time.sleep(0.1)
        return image


def test_validations_keep_to_their_share_of_the_budget() -> None:
    """Validations of 0.2 s in a 3 s budget: a tenth of it (0.3 s) allows one, so after the first (which
    times them) only the last epoch validates, not each of the ten or so."""
    cases = [{"image": torch.zeros(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)}] * 2
    validator = SupervisedEvaluator(device="cpu", val_data_loader=cases, network=_SlowNetwork())
    validated: list[int] = []
    trainer = Engine(lambda engine, batch: time.sleep(0.02))
    budget = TimeBudget(minutes=3 / 60, validator=validator)
    budget.attach(trainer)
    ValidationHandler(interval=1, validator=validator, budget=budget).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validated.append(engine.state.epoch))
    validator.add_event_handler(Events.COMPLETED, lambda _: validated.append(-trainer.state.epoch))
    trainer.run(list(range(1000)), max_epochs=1000)
    runs = [-epoch for epoch in validated if epoch < 0]
    assert trainer.state.max_epochs >= 5, "the budget left room for several epochs"
    assert runs == [1, trainer.state.max_epochs], f"validated at epochs {runs}"
