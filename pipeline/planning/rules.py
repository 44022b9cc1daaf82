"""The planning rules: small pure functions of the fingerprint and the machine, each with its reason.

nnU-Net's experiment planner (Isensee et al., Nature Methods 2021) is the reference they learn from;
the memory and time checks are real forward/backward steps (``probe.py``) rather than a formula that drifts.
Every rule returns its value with a one-line reason naming the figures it came from, which
``plan.yaml`` carries as the value's comment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.planning.fingerprint import Fingerprint
from pipeline.training.distributed import data_loader_workers

CT_MODALITIES = ("CT",)
ANISOTROPY_RATIO = 3.0  # largest/smallest median spacing beyond which the data counts as anisotropic
MIN_FEATURE_SIZE = 4  # voxels an axis keeps at the deepest level (nnU-Net's limit)
MAX_POOLINGS = 5
MIN_BATCH = 2
BATCH_DATASET_SHARE = 0.05  # one batch covers at most this share of the dataset's voxels
# Memory one training step may take: most of a GPU; a quarter of the RAM on a CPU, which also holds
# the cached dataset, the validation volumes and their sliding-window outputs.
MEMORY_SHARE = {"cuda": 0.85, "cpu": 0.25}
# Where the shrinking starts for large cases, per dimension (nnU-Net starts near 256^3; 2D: 512^2).
MAX_PATCH_VOXELS = {3: 160**3, 2: 512**2}


@dataclass(frozen=True)
class Device:
    """The machine a plan is made for."""

    kind: str  # "cpu" or "cuda"
    memory_bytes: int
    cores: int

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_bytes * MEMORY_SHARE[self.kind])

    @staticmethod
    def detect() -> Device:
        """This machine: the first GPU when there is one, else the CPU and its RAM."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if torch.cuda.is_available():
            return Device("cuda", torch.cuda.get_device_properties(0).total_memory, cores)
        return Device("cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), cores)


@dataclass(frozen=True)
class Choice:
    """A planned value and why."""

    value: object
    reason: str


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def target_spacing(fp: Fingerprint) -> tuple[tuple[float, ...], bool, str]:
    """The median spacing per axis; for anisotropic data (largest/smallest median > 3) the coarse
    axis at its 10th percentile instead, never finer than the other axes.

    Why: resampling to the median moves every case the least. On anisotropic data the median of the
    coarse axis would blur the finer scans; its 10th percentile keeps more of their slices at a
    moderate cost of interpolated slices for the others (nnU-Net's rule). Returns (spacing,
    anisotropic, reason).
    """
    spacings = fp.spacings
    median = np.median(spacings, axis=0)
    ratio = float(median.max() / median.min())
    if ratio <= ANISOTROPY_RATIO:
        return tuple(float(s) for s in median), False, f"median spacing {_fmt(median)} mm"
    axis = int(np.argmax(median))
    coarse = max(float(np.percentile(spacings[:, axis], 10)), float(np.delete(median, axis).max()))
    target = tuple(coarse if a == axis else float(s) for a, s in enumerate(median))
    reason = (
        f"anisotropic (median {_fmt(median)} mm, ratio {ratio:.1f} > {ANISOTROPY_RATIO:g}): "
        f"axis {axis} at its 10th percentile {coarse:g} mm"
    )
    return target, True, reason


def recommend_2d(fp: Fingerprint, spacing: Sequence[float]) -> Choice:
    """Whether a 2D (slice-wise) configuration fits better than 3D: when the target spacing is
    anisotropic beyond the threshold, few slices of context cross the coarse axis and 3D kernels
    mostly see interpolated voxels (issue 14 builds the 2D configuration; until then plans stay 3D)."""
    ratio = max(spacing) / min(spacing)
    if ratio > ANISOTROPY_RATIO:
        return Choice(True, f"target spacing {_fmt(spacing)} mm is {ratio:.1f}x coarser out of plane")
    return Choice(False, f"target spacing ratio {ratio:.1f} <= {ANISOTROPY_RATIO:g}: 3D")


def slice_axis(spacing: Sequence[float]) -> int:
    """The axis a 2D network's slices are taken across: the coarsest (on a tie the last, which is the
    slice axis of axial scans after RAS orientation), so each slice keeps the finest grid."""
    coarsest = max(spacing)
    return max(axis for axis, s in enumerate(spacing) if s == coarsest)


@dataclass(frozen=True)
class ChannelNorm:
    """One channel's intensity normalisation: ``ct`` (clip, then a fixed z-score) or ``zscore``
    (each image's own, over its non-zero voxels when ``nonzero``)."""

    scheme: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    nonzero: bool = True
    reason: str = ""


def normalisation(fp: Fingerprint) -> list[ChannelNorm]:
    """Per channel: CT is clipped to the training foreground's 0.5/99.5 percentiles and z-scored with
    its mean and std; anything else gets a per-image z-score (over the non-zero voxels when the
    background is zero).

    Why: CT values are calibrated, so one set of figures from the whole training set keeps their
    meaning across scans and fits any anatomy (a fixed soft-tissue window flattens lung and bone);
    MR values are arbitrary per scan, so only a per-image z-score is comparable.
    """
    ct = fp.modalities[0].upper() in CT_MODALITIES  # the bundles read the first channel's modality
    norms = []
    for channel, name in enumerate(fp.modalities):
        if ct:
            stats = fp.foreground_intensity(channel)
            std = stats.std if stats.std > 0 else 1.0
            reason = (
                f"{name}: foreground of {len(fp.cases)} cases, percentiles 0.5/99.5 "
                f"{stats.p00_5:.4g}/{stats.p99_5:.4g}, mean {stats.mean:.4g}, std {std:.4g}"
            )
            norms.append(ChannelNorm("ct", (stats.p00_5, stats.p99_5), stats.mean, std, False, reason))
        else:
            nonzero = zero_background(fp)
            where = "non-zero voxels (zero background)" if nonzero else "all voxels"
            norms.append(
                ChannelNorm("zscore", nonzero=nonzero, reason=f"{name}: per-image z-score over {where}")
            )
    return norms


def zero_background(fp: Fingerprint, share: float = 0.75) -> bool:
    """Whether the images have a zero background: cropping to the non-zero box keeps under ``share``
    of the median volume (nnU-Net's test for using the non-zero mask)."""
    kept = [np.prod(c.cropped_shape) / np.prod(c.shape) for c in fp.cases]
    return float(np.median(kept)) < share


def median_shape(fp: Fingerprint, spacing: Sequence[float]) -> tuple[float, ...]:
    """The median shape cropped to the foreground and resampled to ``spacing``, in voxels."""
    return tuple(float(s) for s in np.median(fp.shapes_at(spacing), axis=0))


@dataclass(frozen=True)
class Topology:
    """Per-stage, per-axis strides and kernels, DynUNet style (the first stage has stride 1)."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]

    @property
    def poolings(self) -> int:
        return len(self.strides) - 1

    @property
    def divisor(self) -> tuple[int, ...]:
        """The total down-sampling per axis, which the patch must be divisible by."""
        return tuple(int(np.prod(axis)) for axis in zip(*self.strides, strict=True))


def topology(patch: Sequence[float], spacing: Sequence[float], max_poolings: int = MAX_POOLINGS) -> Topology:
    """Down-sampling stages from the patch and the spacing.

    Why: an axis is halved while it keeps at least ``MIN_FEATURE_SIZE`` voxels at the next level, so
    the deepest features still see a neighbourhood; an axis whose spacing is more than twice the
    finest is not down-sampled (kernel 1 along it) until the others have caught up, so every level
    looks at roughly isotropic physical neighbourhoods (nnU-Net's rule, MONAI's DynUNet takes the
    result as ``strides`` and ``kernel_size``).
    """
    size = [float(s) for s in patch]
    current = [float(s) for s in spacing]
    strides, kernels = [(1,) * len(size)], []
    while True:
        finest = min(current)
        caught_up = [c <= 2 * finest for c in current]
        kernels.append(tuple(3 if ok else 1 for ok in caught_up))
        pool = [ok and s / 2 >= MIN_FEATURE_SIZE for ok, s in zip(caught_up, size, strict=True)]
        if not any(pool) or len(strides) > max_poolings:
            break
        strides.append(tuple(2 if p else 1 for p in pool))
        size = [s / 2 if p else s for s, p in zip(size, pool, strict=True)]
        current = [c * 2 if p else c for c, p in zip(current, pool, strict=True)]
    return Topology(tuple(strides), tuple(kernels))


def divisible(shape: Sequence[float], divisor: Sequence[int]) -> tuple[int, ...]:
    """The smallest shape at least ``shape`` and divisible by ``divisor`` per axis."""
    return tuple(int(math.ceil(s / d - 1e-9) * d) for s, d in zip(shape, divisor, strict=True))


def initial_patch(median: Sequence[float], spacing: Sequence[float]) -> tuple[float, ...]:
    """The median shape, capped at ``MAX_PATCH_VOXELS`` of the same physical aspect as the voxels.

    Why: the patch need not be larger than a typical case (a 35x50x35 case is not padded to 96^3);
    a large case starts from a bounded, physically cubic patch so the memory check has few steps.
    """
    inverse = 1 / np.asarray(spacing, dtype=np.float64)
    cap = inverse * (MAX_PATCH_VOXELS[len(spacing)] / np.prod(inverse)) ** (1 / len(spacing))
    return tuple(float(min(m, c)) for m, c in zip(median, cap, strict=True))


def patch_size(
    median: Sequence[float],
    spacing: Sequence[float],
    fits: Callable[[tuple[int, ...]], bool],
    fixed_divisor: Sequence[int] | None = None,
    limit: str = "the memory budget",
) -> tuple[tuple[int, ...], Topology | None, str]:
    """The patch: the median shape made divisible by the network's total down-sampling, shrunk
    along its relatively largest axis until one training step ``fits`` (the memory budget, or the
    time budget's steps).

    ``fixed_divisor`` is the down-sampling of a network of fixed depth; otherwise the topology
    follows the patch (``topology``). Returns (patch, topology or None, reason).
    """
    target = list(initial_patch(median, spacing))
    shrunk = 0
    while True:
        topo, patch = _shaped(target, spacing, fixed_divisor)
        if fits(patch):
            break
        divisor = fixed_divisor or topo.divisor
        axis = int(np.argmax([p / m for p, m in zip(patch, median, strict=True)]))
        if patch[axis] - divisor[axis] < divisor[axis]:
            raise ValueError(
                f"no patch fits the memory budget: {_fmt(patch)} is the smallest for this network"
            )
        target[axis] = patch[axis] - divisor[axis]
        shrunk += 1
    reason = f"median shape {_fmt([round(m) for m in median])} at the target spacing"
    reason += f", divisible by {_fmt(fixed_divisor or topo.divisor)}"
    if shrunk:
        reason += f", shrunk {shrunk} step(s) to fit {limit}"
    return patch, (None if fixed_divisor else topo), reason


def _shaped(
    target: Sequence[float], spacing: Sequence[float], fixed: Sequence[int] | None
) -> tuple[Topology | None, tuple[int, ...]]:
    """The patch for a target shape: with a free topology, recomputed until patch and topology agree."""
    if fixed:
        return None, divisible(target, fixed)
    patch = tuple(round(t) for t in target)
    for _ in range(4):
        topo = topology(patch, spacing)
        grown = divisible(target, topo.divisor)
        if grown == patch:
            break
        patch = grown
    return topology(patch, spacing), patch


def rotate90(patch: Sequence[int]) -> tuple[list[int], float, str]:
    """90-degree rotations only in a plane where the patch is square (a non-square plane changes the
    patch's shape and the batch no longer stacks); the first such plane, none when there is none.
    Returns (axes, probability, reason)."""
    for a in range(len(patch)):
        for b in range(a + 1, len(patch)):
            if patch[a] == patch[b]:
                return [a, b], 0.2, f"patch {_fmt(patch)} is square in plane ({a}, {b})"
    return [0, 1], 0.0, f"patch {_fmt(patch)} is square in no plane: no 90-degree rotations"


def batch_size(
    fp: Fingerprint,
    patch: Sequence[int],
    spacing: Sequence[float],
    device: Device,
    fits: Callable[[int], bool],
) -> tuple[int, str]:
    """At least 2; on a GPU grown while a step still ``fits``, capped so one batch covers at most 5%
    of the dataset's voxels (more would mostly repeat the same voxels each step).

    Why a CPU stays at 2: its voxels per second do not grow with the batch, so a larger batch only
    means fewer optimiser steps in the same time, which costs more accuracy than the smoother
    gradient gains (issue 15: nnU-Net's batch 7 made 100 steps in 10 minutes and reached 0.18).
    """
    total = fp.total_voxels(spacing)
    cap = max(MIN_BATCH, int(BATCH_DATASET_SHARE * total / np.prod(patch)))
    batch = MIN_BATCH
    if device.kind == "cuda":
        while batch < cap and fits(batch + 1):
            batch += 1
        why = (
            f"grown while it fits {device.budget_bytes / 2**30:.1f} GiB, cap {cap} (5% of {total:.3g} voxels)"
        )
    else:
        why = f"CPU: more samples per step would only mean fewer steps (cap {cap} = 5% of {total:.3g} voxels)"
    return min(batch, cap), why


def sw_batch_size(batch: int) -> tuple[int, str]:
    """Sliding windows per forward pass: the training's batch, whose memory the plan probed (a window
    pass holds no gradients), and never one on a CPU.

    Why: PyTorch convolves a single small input with its native kernels rather than oneDNN's (an input
    of batch 1 whose first four sizes multiply to 20480 or less), so one window at a time took 0.18 s
    where two took 0.06 s together (8-wide unet3d, 32x48x40, 2 cores): validation was a third of a
    10-minute budget.
    """
    return max(batch, MIN_BATCH), "the training's batch (probed memory), at least 2: oneDNN's convolutions"


def num_workers(device: Device) -> tuple[int, str]:
    """Data-loader workers: the training's own rule (``data_loader_workers``, whose docstring says why
    none on two cores), with the reason the plan's comment gives."""
    workers = data_loader_workers(device.cores)
    if workers == 0:
        return 0, f"{device.cores} cores: augmentation between steps, both cores for the network"
    return workers, f"{device.cores} cores: one left for the training process"


def features(poolings: int, base: int = 32, cap: int = 320) -> list[int]:
    """Channels per level: ``base`` doubling with depth, capped at ``cap`` (nnU-Net's 3D widths).

    Why the cap: the deepest levels see few voxels, and more than 320 channels there adds most of
    the parameters and memory for little accuracy.
    """
    return [min(base * 2**level, cap) for level in range(poolings + 1)]


def vit_width(base: int) -> dict[str, int]:
    """UNETR's widths for a base width (its decoder's ``feature_size``): a ViT of hidden size 48x that,
    64 channels per attention head and an MLP 4x as wide, so 16 gives ViT-Base (768, 12 heads, 3072),
    UNETR's own.

    Why: the ViT holds most of UNETR's parameters, so narrowing the decoder alone would buy few steps
    under a budget. Its twelve layers stay: UNETR's skip connections read layers 3, 6 and 9.
    """
    hidden = 48 * base
    return {"feature_size": base, "hidden_size": hidden, "mlp_dim": 4 * hidden, "num_heads": hidden // 64}


def samples_per_volume() -> tuple[int, str]:
    """One crop per loaded case, so the planned batch is the patches a step holds (what its memory and
    time were measured for) and they come from as many cases. A second crop would save nothing: the
    cache keeps the preprocessed volumes and cropping is the first random step."""
    return 1, "one crop per case: the batch's patches come from as many cases, the cache loads nothing twice"


# Budget-aware width: the candidates' base widths (channels of the first level, doubling with depth).
WIDTHS = (8, 16, 24, 32)
# Optimiser steps a short training needs to converge. On the hippocampus set (2 CPU cores, 10 min)
# a 16-wide network making ~1600 steps reached a held-out Dice of 0.8x where the 32-wide one made 21
# steps of a larger patch and reached 0.27; nnU-Net v2's plan made 100 steps and reached 0.18.
MIN_STEPS = 1000
# A training iteration against the network's forward/backward alone: loss, optimiser, augmentation
# and logging (0.40 s against 0.25 s, 16-wide hippocampus plan on 2 cores).
STEP_OVERHEAD = 1.6
TRAINING_SHARE = 0.8  # of the budget: the rest goes to caching, validation and checkpoints


def expected_steps(seconds_per_step: float, minutes: float) -> int:
    """Training iterations that fit ``minutes``, from a network step's measured seconds."""
    return round(minutes * 60 * TRAINING_SHARE / (seconds_per_step * STEP_OVERHEAD))


def width_for_budget(
    default: int, seconds_per_step: Callable[[int], float], minutes: float
) -> tuple[int, int, str]:
    """The widest base width, up to the bundle's own, whose expected steps in ``minutes`` reach
    ``MIN_STEPS``; the narrowest when none does. Candidates are timed narrowest first and the timing
    stops at the first that falls short, so a probe never costs more than one slow step.

    Why: with a budget, enough steps to converge beat a larger network that sees 20 of them (issue
    15); without one the plan keeps the bundle's width and plans for accuracy. Returns (width,
    expected steps, reason).
    """
    chosen: tuple[int, int] | None = None
    timed = []
    for width in sorted({w for w in WIDTHS if w < default} | {default}):
        steps = expected_steps(seconds_per_step(width), minutes)
        timed.append(f"{width}: {steps}")
        if chosen is not None and steps < MIN_STEPS:
            break
        chosen = (width, steps)
        if steps < MIN_STEPS:
            break
    width, steps = chosen
    reason = (
        f"widest whose expected steps in {minutes:g} min reach {MIN_STEPS} (timed on this device, "
        f"width: steps {', '.join(timed)})"
    )
    return width, steps, reason
