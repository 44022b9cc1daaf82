"""Adding files and tags to a finished MLflow run, found by its (unique) name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking.safe import filter_value
from pipeline.tracking.store import default_tracking_uri


def find_run_id(client: MlflowClient, experiment_name: str, run_name: str) -> str:
    """The newest run of that name (a name can repeat across run folders: see ``RunTracker``)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"MLflow experiment {experiment_name!r} does not exist at {client.tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = {filter_value(run_name)}")
    if not runs:
        raise ValueError(f"no MLflow run named {run_name!r} in experiment {experiment_name!r}")
    return runs[0].info.run_id


def add_to_run(
    experiment_name: str,
    run_name: str,
    files: Sequence[str | Path] = (),
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Attach artifacts and tags to the named run; returns its run id."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    run_id = find_run_id(client, experiment_name, run_name)
    for path in files:
        client.log_artifact(run_id, str(path))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    return run_id
