"""A plan: the rules' results as bundle config keys, written as ``plan.yaml``, a ``--config_file`` layer.

``plan.yaml`` holds only keys the bundle configs already read (``spacing``, ``patch_size``,
``batch_size``, normalisation keys, the bundle's network arguments), each with a comment naming the
rule and the fingerprint figures it came from. It composes after the shared workflow files and the
bundle's ``model.yaml``, so ``python -m monai.bundle run`` uses it exactly as ``medseg`` does, and a
user edits it or overrides its keys on the command line as any other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.io.atomic import atomic_write
from pipeline.paths import PLANAR_BUNDLES, bundle_dir
from pipeline.planning import rules
from pipeline.planning.fingerprint import Fingerprint, fingerprint
from pipeline.planning.probe import StepProbe

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.yaml"
# Under a time budget the budget sets the epochs (pipeline.training.TimeBudget); the bundle's 100 would
# stop a small dataset's training long before its time is up, so the plan lifts the cap to nnU-Net's.
BUDGET_EPOCH_CAP = 1000
MIN_POOLINGS = 2  # a patch shrunk for time stops before its U-Net would lose its depth
# Networks of fixed depth: the patch must be divisible by their total down-sampling along every axis
# (MultiResUNet and the 2D U-Net: four 2x poolings; UNETR: 16^3 ViT patches). The others take strides
# (and kernels) from the plan.
FIXED_DIVISOR = {"multiresunet": 16, "unetr": 16, "unet2d": 16}
NETWORK_KEYS = {"unet3d": ("features", "strides", "kernel_sizes"), "multiresunet": ("features",),
                "unet2d": ("features",),
                "resunet": ("channels", "strides"), "attention_unet": ("channels", "strides"),
                "unetr": ("feature_size", "hidden_size", "mlp_dim", "num_heads")}  # fmt: skip
# The key holding a bundle's base width (model.yaml's name; a list of widths per level, or one number).
WIDTH_KEY = {"resunet": "channels", "attention_unet": "channels", "unetr": "feature_size"}


@dataclass(frozen=True)
class Plan:
    """The typed view of a plan: ``plan.patch_size`` rather than dict indexing."""

    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    num_workers: int
    rotate90_axes: tuple[int, ...]
    rotate90_prob: float
    samples_per_volume: int = 2
    sw_batch_size: int = 1
    zscore_nonzero: bool = True
    ct_clip: list | None = None
    ct_mean: float | list | None = None
    ct_std: float | list | None = None
    network: dict[str, Any] = field(default_factory=dict)  # the bundle's own network keys
    time_budget_minutes: float | None = None
    spatial_dims: int = 3  # 2 for 2D images: the bundle runs its network in 2D
    slice_axis: int | None = None  # a 2D network on volumes: the axis its slices are taken across
    recommend_2d: bool = False
    reasons: dict[str, str] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)  # header lines: bundle, 2D, expected steps

    def config(self) -> dict[str, Any]:
        """The config keys, as the bundles read them (lists, not tuples)."""
        keys: dict[str, Any] = {
            "planned": True,  # MLflow tells planned runs from the bundle's defaults
            "spacing": list(self.spacing),
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "samples_per_volume": self.samples_per_volume,
            "sw_batch_size": self.sw_batch_size,
            "num_workers": self.num_workers,
            "rotate90_axes": list(self.rotate90_axes),
            "rotate90_prob": self.rotate90_prob,
            "zscore_nonzero": self.zscore_nonzero,
        }
        if self.ct_clip is not None:
            keys.update(ct_clip=self.ct_clip, ct_mean=self.ct_mean, ct_std=self.ct_std)
        if self.spatial_dims != 3:
            keys["spatial_dims"] = self.spatial_dims
        if self.slice_axis is not None:
            keys["slice_axis"] = self.slice_axis
        if self.time_budget_minutes is not None:
            keys["time_budget_minutes"] = self.time_budget_minutes
            keys["max_epochs"] = BUDGET_EPOCH_CAP
        return {**keys, **self.network}

    def to_yaml(self) -> str:
        """YAML text with one comment per value (written by hand: PyYAML drops comments)."""
        lines = [f"# {note}" for note in self.notes]
        for key, value in self.config().items():
            reason = self.reasons.get(key, "")
            lines.append(f"{key}: {_yaml(value)}" + (f"  # {reason}" if reason else ""))
        return "\n".join(lines) + "\n"

    @staticmethod
    def from_config(keys: dict[str, Any]) -> Plan:
        """The typed view of plan keys (a ``plan.yaml`` read back, or a config's resolved keys)."""
        known = {"spacing", "patch_size", "batch_size", "samples_per_volume", "sw_batch_size", "num_workers",
                 "rotate90_axes", "rotate90_prob", "zscore_nonzero", "ct_clip", "ct_mean", "ct_std",
                 "time_budget_minutes", "spatial_dims", "slice_axis"}  # fmt: skip
        missing = {"spacing", "patch_size", "batch_size"} - set(keys)
        if missing:
            raise ValueError(f"plan lacks {', '.join(sorted(missing))}")
        values = {k: v for k, v in keys.items() if k in known}
        known.update({"planned", "max_epochs"})  # max_epochs follows time_budget_minutes
        return Plan(
            **{
                **values,
                "spacing": tuple(float(s) for s in keys["spacing"]),
                "patch_size": tuple(int(s) for s in keys["patch_size"]),
                "rotate90_axes": tuple(keys.get("rotate90_axes", (0, 1))),
                "rotate90_prob": float(keys.get("rotate90_prob", 0.2)),
                "num_workers": int(keys.get("num_workers", 0)),
                "samples_per_volume": int(keys.get("samples_per_volume", 2)),
                "sw_batch_size": int(keys.get("sw_batch_size", 1)),
            },
            network={k: v for k, v in keys.items() if k not in known},
        )


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan {path} does not exist")
    try:
        keys = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"plan {path} is not valid YAML: {error}") from None
    if not isinstance(keys, dict):
        raise ValueError(f"plan {path} holds no config keys")
    try:
        return Plan.from_config(keys)
    except ValueError as error:
        raise ValueError(f"plan {path}: {error}") from None


def write_plan(plan: Plan, path: str | Path) -> Path:
    with atomic_write(path) as handle:
        handle.write(plan.to_yaml().encode())
    return Path(path)


def make_plan(
    fp: Fingerprint,
    bundle: str,
    device: rules.Device,
    minutes: float | None = None,
    step_bytes: Callable[[tuple[int, ...], int, dict], int] | None = None,
    step_seconds: Callable[[tuple[int, ...], int, dict], float] | None = None,
    spatial_dims: int | None = None,
) -> Plan:
    """The plan of ``bundle`` for the fingerprinted data on ``device``; a 2D network (``unet2d``, or
    ``spatial_dims`` 2) on volumes is planned slice-wise, across their coarsest axis.

    ``step_bytes(patch, batch, network_keys)`` is the memory of one training step and
    ``step_seconds`` its time (with ``minutes`` only); by default real probes of the bundle's network
    (``StepProbe``).
    """
    volume_spacing, _, spacing_why = rules.target_spacing(fp)
    dims = 2 if bundle in PLANAR_BUNDLES or spatial_dims == 2 else len(volume_spacing)
    across = rules.slice_axis(volume_spacing) if dims < len(volume_spacing) else None
    plane = [axis for axis in range(len(volume_spacing)) if axis != across]
    spacing = tuple(volume_spacing[axis] for axis in plane)  # the network's grid: the slices' plane
    two_d = rules.recommend_2d(fp, volume_spacing)
    median = tuple(rules.median_shape(fp, volume_spacing)[axis] for axis in plane)
    fixed = fixed_divisor(bundle, dims)
    probe = StepProbe(bundle, len(fp.modalities), len(fp.labels), fixed, spatial_dims=dims)
    measure = step_bytes or probe.bytes
    budget = device.budget_bytes

    def network_for(patch: tuple[int, ...]) -> dict:
        topo = None if fixed else rules.topology(patch, spacing)
        return network_keys(bundle, topo, base_width(bundle))

    def memory_fits(patch: tuple[int, ...]) -> bool:
        return measure(patch, rules.MIN_BATCH, network_for(patch)) <= budget

    patch, topo, patch_why = rules.patch_size(median, spacing, memory_fits, fixed)
    network = network_keys(bundle, topo, base_width(bundle))
    batch, batch_why = rules.batch_size(
        fp, patch, volume_spacing, device, lambda b: measure(patch, b, network) <= budget
    )
    width_why, steps_note = "", "no time budget: the bundle's own width, planned for accuracy"
    if minutes is not None and network:
        fitted = fit_budget(
            bundle, minutes, (patch, topo, patch_why), batch, median, spacing, memory_fits,
            step_seconds or probe.seconds,
        )  # fmt: skip
        (patch, topo, patch_why), network, width_why, steps = fitted
        steps_note = f"expected about {steps} training steps in {minutes:g} min on this device"
    samples, samples_why = rules.samples_per_volume()
    windows, windows_why = rules.sw_batch_size(batch)
    axes, prob, rotate_why = rules.rotate90(patch)
    workers, workers_why = rules.num_workers(device)
    norms = rules.normalisation(fp)
    reasons = {
        "planned": "this configuration comes from a plan (an MLflow param of the training)",
        "spacing": f"target spacing: {spacing_why}",
        "patch_size": f"patch: {patch_why}",
        "batch_size": f"batch: {batch_why}",
        "samples_per_volume": f"crops: {samples_why}",
        "sw_batch_size": f"sliding window: {windows_why}",
        "num_workers": f"workers: {workers_why}",
        "rotate90_axes": f"augmentation: {rotate_why}",
        "rotate90_prob": f"augmentation: {rotate_why}",
        "zscore_nonzero": "normalisation: " + "; ".join(n.reason for n in norms),
        **{key: f"network: {network_why(bundle, key, topo, patch)}" for key in network},
    }
    if width_why:
        key = WIDTH_KEY.get(bundle, "features")
        reasons[key] = f"network: base width {base_of(network[key])} {width_why}"
    ct = [n for n in norms if n.scheme == "ct"]
    clip = mean = std = None
    if ct:
        single = len(ct) == 1
        clip = _round(list(ct[0].clip) if single else [list(n.clip) for n in ct])
        mean = _round(ct[0].mean if single else [n.mean for n in ct])
        std = _round(ct[0].std if single else [n.std for n in ct])
        for key in ("ct_clip", "ct_mean", "ct_std"):
            reasons[key] = "CT normalisation: " + "; ".join(n.reason for n in ct)
    notes = [
        f"plan.yaml for bundle {bundle} from {len(fp.cases)} labelled cases (medseg plan): compose it",
        f"last, after the bundle's configs/model.yaml. Device: {device.kind}, {device.cores} cores, "
        f"memory budget {budget / 2**30:.1f} GiB.",
        _dimension_note(dims, across, median, two_d.value, two_d.reason),
        f"Steps: {steps_note}.",
    ]
    if minutes is not None:
        reasons["time_budget_minutes"] = "time budget: medseg plan --minutes"
        reasons["max_epochs"] = "time budget: the budget sets the epochs, this is only their cap"
    if dims == 2:
        inputs = "the volumes' slices" if across is not None else "2D images"
        reasons["spatial_dims"] = f"2D network: {inputs}"
    if across is not None:
        reasons["slice_axis"] = f"slice-wise: a 2D network across the coarsest axis {across}"
    return Plan(
        spacing=tuple(_round(list(volume_spacing))),
        patch_size=patch,
        batch_size=batch,
        samples_per_volume=samples,
        sw_batch_size=windows,
        num_workers=workers,
        rotate90_axes=tuple(axes),
        rotate90_prob=prob,
        zscore_nonzero=all(n.nonzero for n in norms if n.scheme == "zscore"),
        ct_clip=clip,
        ct_mean=mean,
        ct_std=std,
        network=network,
        time_budget_minutes=minutes,
        spatial_dims=dims,
        slice_axis=across,
        recommend_2d=bool(two_d.value),
        reasons=reasons,
        notes=tuple(notes),
    )


def fit_budget(
    bundle: str,
    minutes: float,
    shaped: tuple[tuple[int, ...], rules.Topology | None, str],
    batch: int,
    median: Sequence[float],
    spacing: Sequence[float],
    memory_fits: Callable[[tuple[int, ...]], bool],
    step_seconds: Callable[[tuple[int, ...], int, dict], float],
) -> tuple[tuple[tuple[int, ...], rules.Topology | None, str], dict, str, int]:
    """The width for the budget (``rules.width_for_budget``) and, when even the narrowest network
    makes fewer than ``MIN_STEPS`` steps at the memory's patch, a smaller patch that does: steps at
    a patch are estimated from its voxels (a step's time follows them), the chosen one is timed; a
    patch that would leave fewer than ``MIN_POOLINGS`` down-samplings is never chosen.

    Returns ((patch, topology, patch reason), network keys, width reason, expected steps).
    """
    patch, topo, patch_why = shaped
    width, steps, width_why = rules.width_for_budget(
        base_width(bundle), lambda w: step_seconds(patch, batch, network_keys(bundle, topo, w)), minutes
    )
    if steps < rules.MIN_STEPS:
        voxels = float(np.prod(patch))

        fixed = fixed_divisor(bundle, len(patch))

        def enough_steps(p: tuple[int, ...]) -> bool:
            if not fixed and rules.topology(p, spacing).poolings < MIN_POOLINGS:
                raise ValueError(f"patch {p} leaves fewer than {MIN_POOLINGS} down-samplings")
            return steps * voxels / float(np.prod(p)) >= rules.MIN_STEPS and memory_fits(p)

        with contextlib.suppress(ValueError):  # none makes enough steps either: the memory's patch stays
            patch, topo, patch_why = rules.patch_size(median, spacing, enough_steps, fixed, "the time budget")
        seconds = step_seconds(patch, batch, network_keys(bundle, topo, width))
        steps = rules.expected_steps(seconds, minutes)
    return (patch, topo, patch_why), network_keys(bundle, topo, width), width_why, steps


def _dimension_note(
    dims: int, across: int | None, median: Sequence[float], recommended: bool, why: str
) -> str:
    if across is not None:
        return f"2D network on the volumes' slices across axis {across} ({_fmt_shape(median)} at the median)."
    if dims == 2:
        return f"2D images: the network runs in 2D ({_fmt_shape(median)} pixels at the median)."
    return f"2D recommended: {'yes' if recommended else 'no'} ({why}); this plan is 3D."


def fixed_divisor(bundle: str, dims: int) -> tuple[int, ...] | None:
    """The total down-sampling per axis of a network of fixed depth, None for the others."""
    divisor = FIXED_DIVISOR.get(bundle)
    return None if divisor is None else (divisor,) * dims


def _fmt_shape(shape: Sequence[float]) -> str:
    return "x".join(str(round(s)) for s in shape)


def base_width(bundle: str) -> int:
    """The bundle's own base width (its model.yaml): the widest a budget may choose."""
    model = yaml.safe_load((bundle_dir(bundle) / "configs" / "model.yaml").read_text())
    return base_of(model[WIDTH_KEY.get(bundle, "features")])


def base_of(width: int | Sequence[int]) -> int:
    return int(width if isinstance(width, int) else width[0])


def network_keys(bundle: str, topo: rules.Topology | None, base: int) -> dict[str, Any]:
    """The bundle's network keys (model.yaml's own names for network_def's arguments)."""
    if bundle == "multiresunet":
        return {"features": rules.features(4, base)}
    if bundle == "unet2d":  # the paper's widths double to the bottom, uncapped
        return {"features": rules.features(4, base, cap=16 * base)}
    if bundle == "unet3d" and topo is not None:
        return {
            "features": rules.features(topo.poolings, base),
            "strides": [list(s) for s in topo.strides[1:]],
            "kernel_sizes": [list(k) for k in topo.kernels],
        }
    if bundle == "unetr":
        return rules.vit_width(base)
    if bundle in ("resunet", "attention_unet") and topo is not None:
        return {
            "channels": rules.features(topo.poolings, base),
            "strides": [list(s) for s in topo.strides[1:]],
        }
    return {}


def network_why(bundle: str, key: str, topo: rules.Topology | None, patch: Sequence[int]) -> str:
    if key == "strides" and topo is not None:
        return f"{topo.poolings} down-samplings of patch {'x'.join(map(str, patch))}, per-axis strides"
    if key == "kernel_sizes" and topo is not None:
        return "3 per axis, 1 along an axis still over twice the finest spacing at that level"
    if bundle == "unetr":
        return f"{key}: the ViT's width follows the base width (ViT-Base at the bundle's own 16)"
    return f"{key}: the bundle's base width doubling per level, capped at 320"


def plan_datalist(
    datalist: str | Path,
    bundle: str = "unet3d",
    minutes: float | None = None,
    output: str | Path | None = None,
    dataset_dir: str | Path | None = None,
    spatial_dims: int | None = None,
) -> tuple[Plan, Path]:
    """Fingerprint, plan and write ``plan.yaml`` (beside the datalist unless ``output``)."""
    bundle_dir(bundle)  # an unknown bundle is refused before any reading
    fp = fingerprint(datalist, dataset_dir)
    plan = make_plan(fp, bundle, rules.Device.detect(), minutes, spatial_dims=spatial_dims)
    path = write_plan(plan, output or Path(datalist).with_name(PLAN_FILE))
    return plan, path


def summary(plan: Plan) -> str:
    """A few lines for the terminal: spacing, patch, batch, network and why."""
    network = ", ".join(f"{k} {v}" for k, v in plan.network.items()) or "the bundle's own"
    lines = [
        f"spacing {plan.spacing} mm   ({plan.reasons.get('spacing', '')})",
        f"patch {list(plan.patch_size)}   ({plan.reasons.get('patch_size', '')})",
        f"batch {plan.batch_size}, workers {plan.num_workers}   ({plan.reasons.get('batch_size', '')})",
        f"network: {network}",
        plan.reasons.get("zscore_nonzero", ""),
    ]
    return "\n".join(lines + [n for n in plan.notes if n.startswith("2D")])


def _round(value: Any, digits: int = 6) -> Any:
    """Floats at ``digits`` significant digits, so plan.yaml stays readable and stable."""
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def _yaml(value: Any) -> str:
    """A flow-style YAML scalar or list that ``yaml.safe_load`` reads back as the same value."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, float):
        return np.format_float_positional(value, trim="0")  # 1e-05 would read back as a string
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
