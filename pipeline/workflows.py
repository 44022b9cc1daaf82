"""Run a bundle's train, inference or evaluate workflow through ``monai.bundle``.

A bundle's workflow is the composition of the shared workflow files in ``bundles/common/``
with the bundle's own ``configs/model.yaml``; ``config_files`` is the one place that knows
the order, and the bundles' docs give the same lists for plain ``python -m monai.bundle run``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle_config

from pipeline.data.datalist import image_cases
from pipeline.io.checkpoint import CheckpointError
from pipeline.io.dicom import SERIES_SEPARATOR, split_series_path
from pipeline.tracking import PROJECT_ROOT, TrackingUnavailable, check_reachable, default_tracking_uri

logger = logging.getLogger(__name__)

BUNDLES_DIR = PROJECT_ROOT / "bundles"
COMMON_DIR = BUNDLES_DIR / "common"
LOGGING_FILE = COMMON_DIR / "logging.conf"
TRACKING_FILE = COMMON_DIR / "tracking.yaml"  # the full MLflow record (MONAI's --tracking settings)
WORKFLOW_FILES: dict[str, tuple[str, ...]] = {
    "train": ("base.yaml", "train.yaml"),
    "multi_gpu_train": ("base.yaml", "train.yaml", "multi_gpu_train.yaml"),
    "inference": ("base.yaml", "inference.yaml"),
    "evaluate": ("base.yaml", "inference.yaml", "evaluate.yaml"),
}
MODEL_FILE = "configs/model.yaml"
METADATA_FILE = "configs/metadata.json"


def available_bundles() -> list[str]:
    return sorted(p.parent.parent.name for p in BUNDLES_DIR.glob(f"*/{MODEL_FILE}"))


def bundle_dir(name: str) -> Path:
    folder = BUNDLES_DIR / name
    if not (folder / MODEL_FILE).is_file():
        raise ValueError(f"unknown bundle {name!r}; available: {', '.join(available_bundles())}")
    return folder


def config_files(name: str, workflow: str) -> list[str]:
    """Shared workflow files first, the bundle's model last, so the bundle's choices win."""
    if workflow not in WORKFLOW_FILES:
        raise ValueError(f"unknown workflow {workflow!r}; one of {', '.join(WORKFLOW_FILES)}")
    return [str(COMMON_DIR / f) for f in WORKFLOW_FILES[workflow]] + [str(bundle_dir(name) / MODEL_FILE)]


def require_valid_data(datalist: str | Path, roles: tuple[str, ...], overrides: Mapping[str, Any]) -> None:
    """Every case of the roles checked before any work (``medseg check``'s report on failure)."""
    from pipeline.data.check import require_valid

    require_valid(datalist, overrides.get("dataset_dir"), roles, val_fold=int(overrides.get("val_fold", 0)))


def usable_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """The inputs that pass the image checks; each refused one is named with its reason, once."""
    from pipeline.data.check import check_image

    usable = []
    for case in image_cases([str(p) for p in inputs]):
        errors = [f for f in check_image(case["image"]) if f.severity == "error"]
        if errors:
            logger.error("skipping %s", errors[0])
        else:
            usable.append(case["image"])
    if not usable:
        raise ValueError(f"none of the {len(inputs)} inputs can be segmented (reasons above)")
    return usable


def absolute(path: str | Path) -> str:
    """An absolute input path; a DICOM ``folder#uid`` keeps its series selector."""
    folder, uid = split_series_path(path)
    return str(folder.resolve()) + (f"{SERIES_SEPARATOR}{uid}" if uid else "")


def require_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first or pass --checkpoint")
    return path


def meta_files(name: str) -> list[str]:
    """Metadata shared by all bundles, then the bundle's own (version, changelog, name, references)."""
    return [str(COMMON_DIR / "metadata.json"), str(bundle_dir(name) / METADATA_FILE)]


def describe(name: str) -> dict[str, Any]:
    """Version and parameter count of a bundle's network, built for its metadata's channels."""
    parser = ConfigParser()
    parser.read_config(config_files(name, "inference"))
    parser.read_meta(meta_files(name))
    io_format = parser["_meta_::network_data_format"]
    parser["in_channels"] = io_format["inputs"]["image"]["num_channels"]
    parser["num_classes"] = io_format["outputs"]["pred"]["num_channels"]
    network = parser.get_parsed_content("network_def")
    parameters = sum(p.numel() for p in network.parameters())
    return {"name": name, "version": parser["_meta_::version"], "parameters": parameters}


def preflight_tracking(overrides: Mapping[str, Any], tracking: bool) -> None:
    """Find out before any data is loaded whether the tracking server answers."""
    if not tracking:
        return
    uri = str(overrides.get("tracking_uri") or default_tracking_uri())
    try:
        check_reachable(uri)
    except TrackingUnavailable as error:
        if overrides.get("tracking_required", True):
            raise
        logger.warning("%s; tracking is optional, so the run goes on untracked", error)


def run_workflow(
    name: str, workflow: str, overrides: Mapping[str, Any] | None = None, tracking: bool = True
) -> None:
    """Run one workflow in this process; ``overrides`` maps config ids to values, as ``--id value`` does."""
    folder = bundle_dir(name)
    preflight_tracking(overrides or {}, tracking)
    run_bundle_config(
        meta_file=meta_files(name),
        config_file=config_files(name, workflow),
        logging_file=str(LOGGING_FILE),
        tracking=str(TRACKING_FILE) if tracking else None,
        bundle_root=str(folder),
        **dict(overrides or {}),
    )


def command_line_value(value: Any) -> str:
    """A value as ``monai.bundle run``'s command line (python-fire) reads it back."""
    return value if isinstance(value, str) else repr(value)


def launch_distributed(name: str, nproc: int, overrides: Mapping[str, Any], tracking: bool = True) -> None:
    """The multi-GPU config under ``torchrun --standalone --nproc_per_node=N`` (one node)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "monai.bundle", "run",
        "--meta_file", str(meta_files(name)),
        "--config_file", str(config_files(name, "multi_gpu_train")),
        "--logging_file", str(LOGGING_FILE),
        "--bundle_root", str(bundle_dir(name)),
    ]  # fmt: skip
    if tracking:
        command += ["--tracking", str(TRACKING_FILE)]
    for key, value in overrides.items():
        command += [f"--{key}", command_line_value(value)]
    subprocess.run(command, check=True)


def train(
    name: str,
    datalist: str | Path,
    output_dir: str | Path,
    epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
    nproc: int = 1,
    check_data: bool = True,
) -> Path:
    """Train a bundle; checkpoints go to ``<output_dir>/models``. Rerunning resumes. Returns that folder.

    With ``nproc`` > 1, one process per GPU (or CPU worker) through torchrun.
    """
    overrides = dict(overrides or {})
    if check_data:
        require_valid_data(datalist, ("train", "validation"), overrides)
    output_dir = Path(output_dir).resolve()
    settings: dict[str, Any] = {
        "datalist": str(Path(datalist).resolve()),
        "output_dir": str(output_dir),
        "ckpt_dir": str(output_dir / "models"),
    }
    if epochs is not None:
        settings["max_epochs"] = int(epochs)
    if nproc > 1:
        preflight_tracking(overrides, tracking)
        launch_distributed(name, nproc, {**settings, **overrides}, tracking)
    else:
        run_workflow(name, "train", {**settings, **overrides}, tracking)
    return output_dir / "models"


def infer(
    name: str,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    checkpoint: str | Path,
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
) -> Path:
    """Segment the inputs into ``<output_dir>/<case>_seg.nii.gz``; returns ``output_dir``."""
    usable = usable_inputs(inputs)
    require_checkpoint(checkpoint)
    output_dir = Path(output_dir).resolve()
    settings = {
        "input": [absolute(p) for p in usable],
        "output_dir": str(output_dir),
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    run_workflow(name, "inference", {**settings, **dict(overrides or {})}, tracking)
    return output_dir


def evaluate(
    name: str,
    datalist: str | Path,
    output_dir: str | Path,
    checkpoint: str | Path,
    split: str = "validation",
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
) -> Path:
    """Score the bundle on a datalist split; ``metrics.csv`` and per-case CSVs go to ``output_dir``."""
    roles = ("train", "validation") if split == "all" else (split,)
    require_valid_data(datalist, roles, overrides or {})
    require_checkpoint(checkpoint)
    output_dir = Path(output_dir).resolve()
    settings = {
        "datalist": str(Path(datalist).resolve()),
        "output_dir": str(output_dir),
        "checkpoint": str(Path(checkpoint).resolve()),
        "eval_split": split,
    }
    run_workflow(name, "evaluate", {**settings, **dict(overrides or {})}, tracking)
    return output_dir
