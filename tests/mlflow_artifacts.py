"""Everything a tracking store holds about its runs, downloaded, to search for what must not leave the
machine: every artifact file of every run (text and binary alike) and every name, param and tag."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mlflow.tracking import MlflowClient


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def run_texts(client: MlflowClient, run, into: Path) -> dict[str, bytes]:
    """Where each piece of a run is shown -> its content: run name, params, tags, metric names and
    every artifact file (downloaded one by one, recursively)."""
    data = run.data
    shown = [run.info.run_name, *data.params, *data.params.values(), *data.tags, *data.tags.values()]
    texts = {"run name, params, tags and metric names": "\n".join([*map(str, shown), *data.metrics]).encode()}
    into.mkdir(parents=True, exist_ok=True)
    for path in artifact_files(client, run.info.run_id):
        local = Path(client.download_artifacts(run.info.run_id, path, str(into)))
        texts[path] = local.read_bytes()
    return texts


def artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, folder):
        files += artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def leaks(tracking_uri: str, secrets: Iterable[str], into: Path) -> list[str]:
    """``run: place: secret`` for every secret found anywhere in any run of the store."""
    client = MlflowClient(tracking_uri)
    found = []
    wanted = [secret for secret in secrets if secret]
    for run in all_runs(client):
        for place, content in run_texts(client, run, into / run.info.run_id).items():
            found += [f"{run.info.run_name}: {place}: {s}" for s in wanted if s.encode() in content]
    return found


def executed_config(client: MlflowClient, run_id: str, into: Path) -> dict:
    """The config artifact of a run (``config/config_*.json``), as MLflow holds it."""
    (path,) = [p for p in artifact_files(client, run_id) if p.startswith("config/")]
    return json.loads(Path(client.download_artifacts(run_id, path, str(into))).read_text())
