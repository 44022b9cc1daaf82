"""``medseg train``'s automatic plan, and what of a training inference needs to know.

A run folder is planned once, when a fresh training starts there: ``plan.yaml`` and a copy of the
fingerprint go into it, and every rerun (a resume) composes that same file, so a resumed network is
the one its checkpoint holds. A folder whose training began without a plan goes on without one.

The checkpoints carry the config keys that shape the network and the preprocessing (the plan's and
the user's overrides), so inference and evaluation rebuild exactly what was trained, without the user
typing any of it again. Keys that only steer the training (epochs, learning rate, augmentation,
workers), paths and tracking settings stay out: they mean nothing to inference, or another machine's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path, PurePath
from typing import Any

import yaml
from monai.bundle import ConfigParser

from pipeline.io.atomic import atomic_write
from pipeline.paths import COMMON_DIR
from pipeline.planning import rules
from pipeline.planning.fingerprint import cache_path, fingerprint
from pipeline.planning.plan import PLAN_FILE, make_plan, read_plan, summary, write_plan

logger = logging.getLogger(__name__)

RUN_FINGERPRINT = "fingerprint.json"  # the fingerprint the run folder's plan was made from
# base.yaml keys that are paths, tracking or this machine's run control, not the model's.
RUN_KEYS = frozenset(
    {
        "imports", "bundle_root", "output_dir", "ckpt_dir", "dataset_dir", "datalist", "dataset_info",
        "checkpoint", "device", "amp", "seed", "num_workers", "tracking_uri", "tracking_required",
        "experiment_name", "bundle_name", "workflow_name", "run_name", "tracked_tags", "compile", "runtime",
    }
)  # fmt: skip
EXPRESSION_PREFIXES = ("$", "@", "%")  # evaluated by MONAI's parser: meaningless outside this run


def run_folder_plan(
    bundle: str,
    datalist: str | Path,
    output_dir: str | Path,
    dataset_dir: str | Path | None = None,
    minutes: float | None = None,
    enabled: bool = True,
    latest: str | Path | None = None,
    spatial_dims: int | None = None,
) -> Path | None:
    """The run folder's ``plan.yaml``: reused when there, else made when ``enabled`` and no training
    began there (``latest``, the training state, absent). None: the bundle's defaults.
    ``spatial_dims`` 2 plans a 3D bundle's network in 2D (slice-wise on volumes)."""
    path = Path(output_dir) / PLAN_FILE
    if path.is_file():
        read_plan(path)  # a broken plan fails now, naming the file, not deep inside MONAI
        kept = " even with --no-plan" if not enabled else ""
        print(f"plan: the run folder's {path.name}, kept as it is{kept} (its training was planned with it)")
        return path
    if not enabled:
        return None
    if latest is not None and Path(latest).is_file():
        print(f"no {path.name} in the run folder: its training began without a plan and goes on so")
        return None
    started = time.perf_counter()
    fp = fingerprint(datalist, dataset_dir)
    plan = make_plan(fp, bundle, rules.Device.detect(), minutes, spatial_dims=spatial_dims)
    write_plan(plan, path)
    copy_fingerprint(datalist, Path(output_dir) / RUN_FINGERPRINT)
    print(f"plan for {bundle} ({time.perf_counter() - started:.0f} s; --no-plan for the bundle's defaults):")
    print("  " + summary(plan).replace("\n", "\n  "))
    print(f"saved as {path.name} in the run folder; key=value arguments override it")
    return path


def patch_followers(plan_file: str | Path | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's keys that follow its patch (90-degree rotations only in a square plane), derived again
    for a ``patch_size`` the user gives over the plan's: a plane the plan found square may not be in
    the user's patch, and its rotations would stop the DataLoader ("stack expects equal size")."""
    patch = overrides.get("patch_size")
    given = isinstance(patch, (list, tuple)) and all(isinstance(size, int) for size in patch)
    if plan_file is None or not given:
        return {}
    axes, probability, _ = rules.rotate90(patch)
    derived = {"rotate90_axes": axes, "rotate90_prob": probability}
    return {key: value for key, value in derived.items() if key not in overrides}


def copy_fingerprint(datalist: str | Path, target: Path) -> None:
    """The fingerprint cache beside the plan, so the run folder keeps what its plan was made from."""
    source = cache_path(datalist)
    if source.is_file():
        with atomic_write(target) as handle:
            handle.write(source.read_bytes())


@cache
def training_only_keys() -> frozenset[str]:
    """Top-level ids that inference never reads: every key train.yaml defines, and the run keys."""
    return frozenset(ConfigParser.load_config_file(str(COMMON_DIR / "train.yaml"))) | RUN_KEYS


def training_config(plan_file: str | Path | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What inference needs of this training: the plan's keys and the user's overrides, less the keys
    that only steer training, paths and tracking (``training_only_keys``) and config expressions.
    Values are plain JSON types: ``torch.load(weights_only=True)`` reads nothing else back."""
    keys = dict(yaml.safe_load(Path(plan_file).read_text()) or {}) if plan_file else {}
    keys.update(overrides)
    kept = {}
    for key, value in keys.items():
        if str(key).split("::")[0] in training_only_keys():
            continue
        try:
            plain = json.loads(json.dumps(value, default=_path_text))
        except (TypeError, ValueError):
            plain = "$"  # not JSON: left out as an expression is
        if _expression(plain):
            logger.warning("override %s is not a plain value: give it again to medseg infer", key)
            continue
        kept[key] = plain
    return kept


def _expression(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith(EXPRESSION_PREFIXES)
    if isinstance(value, Mapping):
        return any(_expression(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_expression(v) for v in value)
    return False


def _path_text(value: Any) -> str:
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a config value")
