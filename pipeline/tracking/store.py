"""The MLflow store runs go to by default, and run names that never collide."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from monai.utils import path_to_sqlite_uri

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def local_store() -> Path:
    """The checkout's ``mlflow/`` when running from one (what ``make mlflow-ui`` serves), else the
    working directory's: an installed package must not write into site-packages."""
    root = PROJECT_ROOT if (PROJECT_ROOT / "bundles").is_dir() else Path.cwd()
    return root / "mlflow" / "mlruns.db"


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
