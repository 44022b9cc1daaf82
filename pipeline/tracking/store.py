"""The MLflow store runs go to by default, and run names that never collide."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from monai.utils import path_to_sqlite_uri

from pipeline.io.atomic import atomic_write
from pipeline.paths import PROJECT_ROOT, home, in_checkout, installed_version
from pipeline.training.distributed import is_main_process

# Fail fast instead of MLflow's minutes of retries when a tracking server is gone (a user's own
# settings win); every tracking path imports this module first.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def local_store() -> Path:
    """``mlflow/`` in medseg's home: ``MEDSEG_HOME``, else the checkout (what ``make mlflow-ui`` serves),
    else the working directory, so an installed package never writes into site-packages."""
    return home() / "mlflow" / "mlruns.db"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be used, and tracking was not declared optional."""


def git_commit() -> str:
    """The project's commit, so a run says which code produced it; an installed package names its
    version instead (``medseg-pipeline==0.1.0``), since site-packages has no history."""
    if not in_checkout():
        return installed_version()
    try:
        result = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's own SQLite store (what ``make mlflow-ui`` serves).

    MONAI's MLFlowHandler keeps a SQLite store's artifacts in ``mlruns/`` beside the database.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = local_store()
    store.parent.mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(str(store))


def new_run_name(prefix: str) -> str:
    """A unique run name.

    MONAI's MLFlowHandler given no run name attaches to *any* unfinished run of the experiment,
    so a crashed run would swallow the next one; a name per run prevents that.
    """
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


RUN_NAME_FILE = "mlflow_run_name.txt"


def training_run_name(ckpt_dir: str | Path, prefix: str) -> str:
    """The run name of the training that writes to ``ckpt_dir``: stored beside its checkpoints on
    first use, so that running the same command again continues the same MLflow run."""
    return kept_text(Path(ckpt_dir) / RUN_NAME_FILE, lambda: new_run_name(prefix), write=is_main_process())


FOLDER_ID_FILE = "mlflow_run_folder_id.txt"


def run_folder_id(folder: str | Path) -> str:
    """A random identity of a run folder, kept in it: a run is tagged with it (never with the path),
    so a run name is reopened only by the folder that created it."""
    return kept_text(Path(folder) / FOLDER_ID_FILE, lambda: secrets.token_hex(8))


def kept_text(path: Path, make: Callable[[], str], write: bool = True) -> str:
    """A one-line value kept in ``path``: read back when there, else made and written atomically (an
    empty file, which a writer killed before this change could leave, counts as absent: an empty run
    name would let MLflow's handler attach to any unfinished run)."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    value = make()
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            handle.write((value + "\n").encode())
    return value


def training_run_of(checkpoint: str | Path) -> str:
    """The training run that produced a checkpoint, for linking evaluation and inference runs to it."""
    path = Path(checkpoint).parent / RUN_NAME_FILE
    return path.read_text().strip() if path.is_file() else "unknown"


def check_reachable(uri: str) -> None:
    """Ask the server once, before any data is loaded, so a typo'd URI fails in seconds, not after caching."""
    if not uri.startswith(("http://", "https://")):
        return

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} cannot be reached ({type(error).__name__}); start it, fix "
            "MLFLOW_TRACKING_URI / --tracking-uri, or pass --tracking-optional"
        ) from None


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id, creating it as MONAI's MLFlowHandler would: a local SQLite store keeps its
    artifacts in ``mlruns/`` beside the database, not in whatever the working directory is."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = str(client.tracking_uri)
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)
