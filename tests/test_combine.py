"""Test-time mirroring, ensembles and the wall-clock budget, on small real networks."""

from __future__ import annotations

import time

import pytest
import torch
from ignite.engine import Engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.optimizers import WarmupCosineSchedule

from pipeline.inference.combine import EnsembleInferer, FlipAveragingInferer, flip_combinations
from pipeline.training.budget import TimeBudget


class CountingInferer(SimpleInferer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return super().__call__(inputs, network, *args, **kwargs)


def lopsided_network() -> torch.nn.Module:
    """A 3-class conv whose kernel has no mirror symmetry, so flipping the input changes the output."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
    with torch.no_grad():
        network.weight[:, :, 0] *= 4.0  # weight the first slice of the kernel on every axis differently
        network.weight[:, :, :, 2] *= -3.0
    return network.eval()


def test_flip_combinations_cover_every_subset_once() -> None:
    combos = flip_combinations((0, 1, 2))
    assert len(combos) == 8 and len(set(combos)) == 8
    assert () in combos and (2, 3, 4) in combos


def test_mirroring_averages_the_softmax_of_every_flip() -> None:
    network, image = lopsided_network(), torch.rand(1, 1, 9, 10, 11)
    counting = CountingInferer()
    with torch.no_grad():
        mirrored = torch.softmax(FlipAveragingInferer(counting, (0, 1, 2))(image, network), dim=1)
        plain = torch.softmax(network(image), dim=1)
        expected = (
            sum(
                torch.flip(torch.softmax(network(torch.flip(image, dims)), dim=1), dims) if dims else plain
                for dims in flip_combinations((0, 1, 2))
            )
            / 8
        )
    assert counting.calls == 8
    assert torch.allclose(mirrored, expected, atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-3), "a lopsided network must change under mirroring"


def test_mirroring_wraps_a_sliding_window() -> None:
    network, image = lopsided_network(), torch.rand(1, 1, 20, 18, 16)
    window = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.25)
    with torch.no_grad():
        out = FlipAveragingInferer(window, (0, 1))(image, network)
    assert out.shape == (1, 3, 20, 18, 16)
    assert torch.allclose(torch.softmax(out, 1).sum(1), torch.ones(1, 20, 18, 16), atol=1e-5)


def test_ensemble_is_the_mean_of_its_members_probabilities() -> None:
    first, second = lopsided_network(), torch.nn.Conv3d(1, 3, kernel_size=1).eval()
    image = torch.rand(1, 1, 6, 7, 8)
    ensemble = EnsembleInferer([(SimpleInferer(), first), (SimpleInferer(), second)])
    with torch.no_grad():
        out = torch.softmax(ensemble(image, network=None), dim=1)
        expected = (torch.softmax(first(image), 1) + torch.softmax(second(image), 1)) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleInferer([])


def test_time_budget_replans_epochs_and_the_schedule() -> None:
    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = WarmupCosineSchedule(optimiser, warmup_steps=1, t_total=50)
    trainer = Engine(lambda engine, batch: time.sleep(0.05))
    budget = TimeBudget(minutes=0.3 / 60, lr_scheduler=schedule, iterations_per_epoch=3)
    budget.attach(trainer)  # 0.3 s, about 2 epochs of 0.15 s
    trainer.run([0, 1, 2], max_epochs=50)
    assert 1 <= trainer.state.epoch <= 3
    assert schedule.t_total == trainer.state.max_epochs == trainer.state.epoch


def test_no_budget_leaves_training_alone() -> None:
    trainer = Engine(lambda engine, batch: None)
    TimeBudget(minutes=None).attach(trainer)
    trainer.run([0], max_epochs=4)
    assert trainer.state.epoch == 4
