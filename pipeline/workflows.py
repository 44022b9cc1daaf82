"""Run a bundle's train, inference or evaluate workflow through ``monai.bundle``.

A bundle's workflow is the composition of the shared workflow files in ``bundles/common/``
with the bundle's own ``configs/model.yaml``; ``pipeline.paths.config_files`` is the one place that
knows the order and where the files are, and ``medseg config-files`` prints the same lists for plain
``python -m monai.bundle run``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle_config

from pipeline.bundle_parser import bundle_parser
from pipeline.data.check import check_image, require_valid
from pipeline.data.datalist import cases as datalist_cases
from pipeline.inference.batch import CaseFailures, Failure, cases_to_segment
from pipeline.inference.parallel import require_workers, segment_in_workers
from pipeline.io.atomic import DiskFullError
from pipeline.io.checkpoint import CheckpointError, load_network_weights, with_training_config
from pipeline.io.dicom import SERIES_SEPARATOR, split_series_path
from pipeline.io.inspect import spatial_dims
from pipeline.paths import (  # noqa: F401  (re-exported: callers import the bundle locations from here)
    BUNDLES_DIR,
    COMMON_DIR,
    LOGGING_FILE,
    METADATA_FILE,
    MODEL_FILE,
    PROJECT_ROOT,
    TRACKING_FILE,
    WORKFLOW_FILES,
    available_bundles,
    bundle_dir,
    config_files,
    meta_files,
)
from pipeline.planning.auto import patch_followers, run_folder_plan, training_config
from pipeline.tracking import TrackingUnavailable, check_reachable, default_tracking_uri
from pipeline.training.interrupt import TrainingInterrupted, last_interruption
from pipeline.training.run_folder import LATEST_FILE

logger = logging.getLogger(__name__)


def require_valid_data(datalist: str | Path, roles: tuple[str, ...], overrides: Mapping[str, Any]) -> None:
    """Every case of the roles checked before any work (``medseg check``'s report on failure)."""
    require_valid(datalist, overrides.get("dataset_dir"), roles, val_fold=int(overrides.get("val_fold", 0)))


def network_dims(name: str, workflow: str, overrides: Mapping[str, Any]) -> tuple[int, bool]:
    """The network's spatial dimension, and whether it runs slice-wise on volumes (``slice_axis``)."""
    dims = int(workflow_setting(name, workflow, "spatial_dims", overrides))
    return dims, workflow_setting(name, workflow, "slice_axis", overrides) is not None


def dimension_problem(path: str | Path, network: tuple[int, bool]) -> str | None:
    """Why the network cannot take this image, in words, rather than failing inside MONAI's
    transforms; None when it can (a volume for a 2D network that runs slice-wise)."""
    data, (dims, slice_wise) = spatial_dims(path), network
    if data == dims or (data == 3 and dims == 2 and slice_wise):
        return None
    if data == 2:
        return "is a 2D image and the network is set up in 3D (spatial_dims=2 sets it up in 2D)"
    return "is a volume and the network is 2D (slice_axis=0, 1 or 2 runs it slice by slice)"


def require_network_fits_data(name: str, datalist: str | Path, overrides: Mapping[str, Any]) -> None:
    """2D images for a network set up in 3D, or volumes for a 2D one, are refused before training
    (the plan sets ``spatial_dims`` and ``slice_axis`` itself unless --no-plan)."""
    image = datalist_cases(datalist, overrides.get("dataset_dir"), role="train")[0]["image"]
    first = image if isinstance(image, (str, Path)) else image[0]
    problem = dimension_problem(first, network_dims(name, "train", overrides))
    if problem:
        raise ValueError(f"{first} {problem}, or let the plan choose (no --no-plan)")


def usable_inputs(
    cases: Sequence[Mapping[str, Any]], network: tuple[int, bool]
) -> tuple[list[Mapping[str, Any]], list[Failure]]:
    """The cases that pass the image checks and fit the network's dimension, and the refused ones,
    each logged with its reason once."""
    usable, refused = [], []
    for case in cases:
        errors = [f.problem for f in check_image(case["image"]) if f.severity == "error"]
        first = case["image"] if isinstance(case["image"], (str, Path)) else case["image"][0]
        problem = errors[0] if errors else dimension_problem(first, network)
        if problem:
            logger.error("skipping %s: %s", case["image"], problem)
            refused.append(Failure(str(case["image"]), problem))
        else:
            usable.append(case)
    return usable, refused


def absolute(path: str | Path) -> str:
    """An absolute input path; a DICOM ``folder#uid`` keeps its series selector."""
    folder, uid = split_series_path(path)
    return str(folder.resolve()) + (f"{SERIES_SEPARATOR}{uid}" if uid else "")


def require_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first or pass --checkpoint")
    return path


# Errors whose message is the whole story for a user (they name the file and what is wrong).
USER_ERRORS = (FileNotFoundError, ValueError, CheckpointError, CaseFailures, DiskFullError)


@contextmanager
def user_errors() -> Iterator[None]:
    """MONAI wraps an error raised inside a config expression in ``RuntimeError("Failed to evaluate
    ...")`` with the whole config item; re-raise the user's own error (a missing file) as it is."""
    try:
        yield
    except RuntimeError as error:
        cause: BaseException = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not error and isinstance(cause, USER_ERRORS):
            raise cause from None
        raise


def require_fitting_checkpoint(
    name: str, checkpoint: str | Path, overrides: Mapping[str, Any], workflow: str = "inference"
) -> Path:
    """The checkpoint exists and fits the bundle's network as configured (its training config beneath
    ``overrides``), checked before any data is read: a wrong one fails here, naming the file and the
    first differing parameter."""
    path = require_checkpoint(checkpoint)
    parser = bundle_parser(name, workflow, overrides, checkpoint=path)
    with user_errors():
        network = parser.get_parsed_content("network_def")
    load_network_weights(network, path)
    return path


def describe(name: str) -> dict[str, Any]:
    """Version and parameter count of a bundle's network, built for its metadata's channels."""
    parser = bundle_parser(name, "inference")
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
    name: str,
    workflow: str,
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
) -> None:
    """Run one workflow in this process; ``overrides`` maps config ids to values, as ``--id value`` does."""
    folder = bundle_dir(name)
    preflight_tracking(overrides or {}, tracking)
    with user_errors():
        run_bundle_config(
            meta_file=meta_files(name),
            config_file=config_files(name, workflow),
            logging_file=str(LOGGING_FILE),
            tracking=str(TRACKING_FILE) if tracking else None,
            bundle_root=str(folder),
            **dict(overrides or {}),
        )


def command_line_value(value: Any) -> str:
    """A value as ``monai.bundle run``'s command line (python-fire) reads it back: a Python literal.
    A string is quoted too, or python-fire would read ``2024`` as an int and ``exp,1`` as a tuple."""
    return repr(os.fspath(value) if isinstance(value, os.PathLike) else value)


def launch_distributed(
    name: str,
    nproc: int,
    overrides: Mapping[str, Any],
    tracking: bool = True,
) -> None:
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
    plan: bool = True,
    minutes: float | None = None,
) -> Path:
    """Train a bundle; checkpoints go to ``<output_dir>/models``. Rerunning resumes. Returns that folder.

    A fresh run folder is planned from the data, the machine and ``minutes`` (``plan.yaml`` there,
    composed after the bundle's model; a resume reuses it, ``overrides`` win over it); ``plan=False``
    trains on the bundle's defaults. ``minutes`` is also the training's ``time_budget_minutes``.
    With ``nproc`` > 1, one process per GPU (or CPU worker) through torchrun. A run stopped by
    SIGINT/SIGTERM raises ``TrainingInterrupted`` once its checkpoint is written.
    """
    bundle_dir(name)  # an unknown bundle fails before any data is read or planned
    overrides = dict(overrides or {})
    if minutes is not None:
        overrides.setdefault("time_budget_minutes", float(minutes))
    if check_data:
        require_valid_data(datalist, ("train", "validation"), overrides)
    output_dir = Path(output_dir).resolve()
    ckpt_dir = output_dir / "models"
    preflight_tracking(overrides, tracking)  # a server that is down stops the run before it plans
    planned = run_folder_plan(
        name, datalist, output_dir, overrides.get("dataset_dir"), minutes, plan, ckpt_dir / LATEST_FILE,
        overrides.get("spatial_dims"),
    )  # fmt: skip
    # The plan's keys go in beneath the user's, as the last config layer would (a file from the run
    # folder in the --config_file list would make MONAI warn that the configs span two folders).
    plan_keys = ConfigParser.load_config_file(str(planned)) if planned else {}
    overrides = {**plan_keys, **patch_followers(planned, overrides), **overrides}
    require_network_fits_data(name, datalist, overrides)
    settings: dict[str, Any] = {
        "datalist": str(Path(datalist).resolve()),
        "output_dir": str(output_dir),
        "ckpt_dir": str(ckpt_dir),
        "training_config": training_config(planned, overrides),
    }
    if epochs is not None:  # over the plan's cap too
        overrides["max_epochs"] = int(epochs)
    if nproc > 1:
        launch_distributed(name, nproc, {**settings, **overrides}, tracking)
    else:
        run_workflow(name, "train", {**settings, **overrides}, tracking)
        stopped = last_interruption()
        if stopped is not None:
            raise TrainingInterrupted(stopped)
    return output_dir / "models"


def workflow_setting(name: str, workflow: str, key: str, overrides: Mapping[str, Any]) -> Any:
    """A plain (not computed) config value as the workflow will see it: override, else its files."""
    if key in overrides:
        return overrides[key]
    return ConfigParser.load_config_files(config_files(name, workflow))[key]


def infer(
    name: str,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    checkpoint: str | Path,
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
    overwrite: bool = False,
    nproc: int = 1,
) -> Path:
    """Segment the inputs into ``<output_dir>/<case>_seg.nii.gz``; returns ``output_dir``.

    Cases already segmented there are skipped unless ``overwrite``. A case that cannot be
    segmented is skipped and the others go on; ``CaseFailures`` then lists every failure. Each
    case's name is unique within all ``inputs`` (``cases_to_segment``), decided before any work.
    With ``nproc`` > 1 the cases are split over that many worker processes (one per GPU, else CPU
    processes sharing the cores: ``pipeline.inference.parallel``), tracked as one MLflow run.
    """
    require_workers(nproc)  # before any data is read
    overrides = dict(overrides or {})
    overwrite = bool(overwrite or overrides.pop("overwrite", False))  # the flag, or the config key
    output_dir = Path(output_dir).resolve()
    postfix = workflow_setting(name, "inference", "output_postfix", overrides)
    dicom_seg = bool(workflow_setting(name, "inference", "dicom_seg", overrides))
    pending = cases_to_segment(inputs, output_dir, postfix, overwrite, dicom_seg)
    if not pending:
        return output_dir
    require_fitting_checkpoint(name, checkpoint, overrides)
    overrides = with_training_config(checkpoint, overrides)  # the network and preprocessing trained
    usable, refused = usable_inputs(pending, network_dims(name, "inference", overrides))
    settings = {
        "input": [absolute(case["image"]) for case in usable],
        "case_names": [case["case_name"] for case in usable],  # the whole batch's names, not the rest's
        "output_dir": str(output_dir),
        "checkpoint": str(Path(checkpoint).resolve()),
        "overwrite": overwrite,
    }
    failed = segment(name, usable, {**settings, **overrides}, tracking, nproc) if usable else []
    if refused or failed:
        raise CaseFailures(refused + failed, len(pending))
    return output_dir


def segment(
    name: str, cases: Sequence[Mapping[str, Any]], keys: Mapping[str, Any], tracking: bool, nproc: int
) -> list[Failure]:
    """The failures of segmenting ``cases`` (``keys``: the batch's config keys), in this process or
    in ``nproc`` workers."""
    if nproc > 1:
        preflight_tracking(keys, tracking)
        cases = [{**case, "image": absolute(case["image"])} for case in cases]
        return segment_in_workers(name, cases, keys, nproc, tracking)
    try:
        run_workflow(name, "inference", keys, tracking)
    except CaseFailures as failures:
        return failures.failures
    return []


def evaluate(
    name: str,
    datalist: str | Path,
    output_dir: str | Path,
    checkpoint: str | Path,
    split: str = "validation",
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
) -> Path:
    """Score the bundle on a datalist split; ``metrics.csv`` and per-case CSVs go to ``output_dir``.
    The checkpoint's training config (network, preprocessing) lies beneath ``overrides``."""
    roles = ("train", "validation") if split == "all" else (split,)
    require_valid_data(datalist, roles, overrides or {})
    require_fitting_checkpoint(name, checkpoint, overrides or {}, "evaluate")
    overrides = with_training_config(checkpoint, overrides or {})
    output_dir = Path(output_dir).resolve()
    settings = {
        "datalist": str(Path(datalist).resolve()),
        "output_dir": str(output_dir),
        "checkpoint": str(Path(checkpoint).resolve()),
        "eval_split": split,
    }
    run_workflow(name, "evaluate", {**settings, **dict(overrides or {})}, tracking)
    return output_dir


def infer_ensemble(
    names: Sequence[str],
    checkpoints: Sequence[str | Path],
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    tracking: bool = True,
    overwrite: bool = False,
    nproc: int = 1,
) -> Path:
    """One segmentation per input from the mean softmax of several checkpoints (bundles or folds).

    The first member's inference workflow runs (its preprocessing, inversion and writing); every
    member brings its own network and sliding window (from its checkpoint's training config, beneath
    ``overrides``), and must share the preprocessed space. ``nproc`` splits the cases as ``infer``
    does (each worker runs every member).
    """
    if not names or len(names) != len(checkpoints):
        raise ValueError(f"an ensemble needs one checkpoint per member: {list(names)}, {list(checkpoints)}")
    overrides = dict(overrides or {})
    for name, checkpoint in zip(names, checkpoints, strict=True):
        require_fitting_checkpoint(name, checkpoint, overrides)  # every member, before any image is read
    pairs = zip(names, checkpoints, strict=True)
    members = [{"bundle": name, "checkpoint": str(Path(path).resolve())} for name, path in pairs]
    settings = {"ensemble": members, "ensemble_overrides": overrides}
    keys = {**overrides, **settings}
    return infer(names[0], inputs, output_dir, checkpoints[0], keys, tracking, overwrite, nproc)
