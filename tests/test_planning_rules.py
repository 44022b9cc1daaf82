"""The planning rules on made-up fingerprints (no files), and the memory probe on a tiny network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.planning import probe, rules
from pipeline.planning.fingerprint import CaseStats, ChannelStats, Fingerprint

CPU = rules.Device("cpu", 16 * 2**30, 2)
GPU = rules.Device("cuda", 80 * 2**30, 16)


def made_up(
    shapes: list[tuple[int, int, int]],
    spacings: list[tuple[float, float, float]],
    modality: str = "MRI",
    foreground: list[ChannelStats] | None = None,
    cropped: float = 1.0,
) -> Fingerprint:
    """A fingerprint of cases with the given shapes and spacings (cropped by ``cropped`` per axis)."""
    stats = foreground or [ChannelStats(mean=100.0, std=20.0, p00_5=50.0, p99_5=150.0, voxels=1000)]
    cases = tuple(
        CaseStats(
            name=f"case_{i:03d}.nii.gz",
            spacing=spacing,
            shape=shape,
            cropped_shape=tuple(int(s * cropped) for s in shape),
            foreground=(stats[i % len(stats)],),
            class_fractions={0: 0.9, 1: 0.1},
        )
        for i, (shape, spacing) in enumerate(zip(shapes, spacings, strict=True))
    )
    return Fingerprint(cases=cases, modalities=(modality,), labels={0: "background", 1: "organ"})


def hippocampus_like(n: int = 20) -> Fingerprint:
    rng = np.random.default_rng(0)
    shapes = [
        (35 + int(rng.integers(-3, 4)), 50 + int(rng.integers(-4, 5)), 35 + int(rng.integers(-4, 5)))
        for _ in range(n)
    ]
    return made_up(shapes, [(1.0, 1.0, 1.0)] * n)


def always(_: object) -> bool:
    return True


def test_isotropic_small_cases_get_a_patch_near_their_median_shape_not_96() -> None:
    fp = hippocampus_like()
    spacing, anisotropic, _ = rules.target_spacing(fp)
    assert spacing == (1.0, 1.0, 1.0) and not anisotropic
    median = rules.median_shape(fp, spacing)
    free, topo, _ = rules.patch_size(median, spacing, always)
    assert free == (40, 56, 40)  # nnU-Net's plan for MSD hippocampus
    assert topo.poolings == 3 and topo.divisor == (8, 8, 8)
    fixed, _, reason = rules.patch_size(median, spacing, always, fixed_divisor=(16, 16, 16))
    assert fixed == (48, 64, 48) and "divisible by 16x16x16" in reason
    assert not rules.recommend_2d(fp, spacing).value


def test_anisotropic_data_takes_the_coarse_axis_at_its_10th_percentile_and_recommends_2d() -> None:
    spacings = [(0.8, 0.8, 5.0)] * 8 + [(0.8, 0.8, 3.0)] * 2
    fp = made_up([(400, 400, 60)] * 10, spacings)
    spacing, anisotropic, reason = rules.target_spacing(fp)
    assert anisotropic and "10th percentile" in reason
    assert spacing[:2] == (0.8, 0.8)
    assert spacing[2] == pytest.approx(np.percentile([5.0] * 8 + [3.0] * 2, 10))  # 3.0, not the median 5.0
    assert rules.recommend_2d(fp, spacing).value
    topo = rules.topology((160, 160, 32), (0.8, 0.8, 5.0))
    # in-plane first, the 5 mm axis only once the in-plane spacing is within 2x of it
    assert topo.strides[:4] == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2))
    assert topo.kernels[:3] == ((3, 3, 1), (3, 3, 1), (3, 3, 3))


def test_a_median_case_larger_than_the_memory_budget_gets_a_smaller_patch() -> None:
    fp = made_up([(128, 128, 128)] * 5, [(1.0, 1.0, 1.0)] * 5)
    median = rules.median_shape(fp, (1.0, 1.0, 1.0))
    roomy, _, _ = rules.patch_size(median, (1.0, 1.0, 1.0), always)
    assert roomy == (128, 128, 128)
    tight, topo, reason = rules.patch_size(median, (1.0, 1.0, 1.0), lambda p: np.prod(p) <= 96**3)
    assert np.prod(tight) <= 96**3 and "shrunk" in reason
    assert all(p % d == 0 for p, d in zip(tight, topo.divisor, strict=True))
    with pytest.raises(ValueError, match="no patch fits"):
        rules.patch_size(median, (1.0, 1.0, 1.0), lambda p: False)


def test_rotate90_only_in_a_square_plane_of_the_patch() -> None:
    assert rules.rotate90((48, 64, 48))[:2] == ([0, 2], 0.2)
    assert rules.rotate90((64, 64, 32))[:2] == ([0, 1], 0.2)
    _, prob, reason = rules.rotate90((40, 56, 72))
    assert prob == 0.0 and "no plane" in reason


def test_batch_grows_on_a_gpu_up_to_5_percent_of_the_dataset_and_stays_2_on_a_cpu() -> None:
    fp = made_up([(100, 100, 100)] * 40, [(1.0, 1.0, 1.0)] * 40)
    patch = (32, 32, 32)
    cap = int(0.05 * 40 * 100**3 / 32**3)  # 61
    assert rules.batch_size(fp, patch, (1.0, 1.0, 1.0), GPU, always)[0] == cap
    assert rules.batch_size(fp, patch, (1.0, 1.0, 1.0), GPU, lambda b: b <= 9)[0] == 9
    assert rules.batch_size(fp, patch, (1.0, 1.0, 1.0), CPU, always)[0] == 2
    small = made_up([(20, 20, 20)] * 2, [(1.0, 1.0, 1.0)] * 2)
    assert rules.batch_size(small, (16, 16, 16), (1.0, 1.0, 1.0), GPU, always)[0] == 2  # at least 2


def test_workers_follow_the_cores() -> None:
    assert rules.num_workers(rules.Device("cpu", 2**30, 2))[0] == 0
    assert rules.num_workers(rules.Device("cpu", 2**30, 4))[0] == 3
    assert rules.num_workers(rules.Device("cpu", 2**30, 64))[0] == 8


def test_ct_normalisation_pools_the_foreground_of_the_training_set() -> None:
    a = ChannelStats(mean=0.0, std=10.0, p00_5=-50.0, p99_5=50.0, voxels=1000)
    b = ChannelStats(mean=100.0, std=10.0, p00_5=50.0, p99_5=150.0, voxels=3000)
    fp = made_up([(50, 50, 50)] * 2, [(1.0, 1.0, 1.0)] * 2, modality="CT", foreground=[a, b])
    (norm,) = rules.normalisation(fp)
    assert norm.scheme == "ct"
    assert norm.mean == pytest.approx(75.0)
    assert norm.std == pytest.approx(np.sqrt(0.25 * 100 + 0.75 * 100 + 0.25 * 0.75 * 100**2))
    assert norm.clip == pytest.approx((25.0, 125.0))
    mri = rules.normalisation(made_up([(50, 50, 50)] * 2, [(1.0, 1.0, 1.0)] * 2, cropped=0.6))
    assert mri[0].scheme == "zscore" and mri[0].nonzero  # the crop to non-zero drops 78%: zero background
    assert not rules.normalisation(hippocampus_like())[0].nonzero


def test_features_double_up_to_320() -> None:
    assert rules.features(4, 32) == [32, 64, 128, 256, 320]
    assert rules.features(3, 16) == [16, 32, 64, 128]


def test_the_budget_takes_the_widest_network_that_still_makes_enough_steps() -> None:
    timed = []

    def seconds(width: int) -> float:
        timed.append(width)
        return {8: 0.1, 16: 0.25, 24: 0.5, 32: 1.0}[width]

    width, steps, reason = rules.width_for_budget(32, seconds, minutes=10)  # 480 s at 1.6x a step
    assert (width, steps) == (16, 1200) and timed == [8, 16, 24], "no wider network is timed after 24"
    assert "8: 3000, 16: 1200, 24: 600" in reason
    assert rules.width_for_budget(32, seconds, minutes=1)[:2] == (8, 300), "none reaches: the narrowest"
    assert rules.width_for_budget(16, seconds, minutes=600)[0] == 16, "never wider than the bundle's own"


def test_measure_step_sees_the_activations_of_a_real_forward_backward() -> None:
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 1)
    )
    small = probe.measure_step(network, (16, 16, 16), 2, 1)
    large = probe.measure_step(network, (64, 64, 64), 2, 1)
    activation = 2 * 8 * 64**3 * 4  # one 8-channel float32 feature map of the batch
    assert large.peak_bytes >= activation and large.peak_bytes > small.peak_bytes
    assert large.seconds > 0
    assert all(p.grad is None for p in network.parameters())
