"""MONAI's MLFlowHandler, made fit for hours-long runs on a shared tracking server.

What it adds: a resumed training continues its own run (found by its stored name, finished or
not); params already recorded are not re-sent (MLflow refuses changed values); tags; a server
that is down at start stops the run with a clear message (unless tracking is optional); a
server lost mid-run is reported once and training goes on. The validation tracker also records
per-class Dice and IoU under the label names, the best value so far, the last validation's
per-case table and, every few validations, overlays of the first cases.

A training killed at any moment and run again keeps one continuous series per metric, without gaps
or repeated steps: metrics are buffered and sent (one ``log_batch``) at the end of each epoch, before
the epoch's checkpoint is written (``TrainingCheckpoints`` saves last), and a reopened run sends only
steps beyond those it already holds. An epoch recorded but not checkpointed before a kill is run
again on resume; its steps are then already in MLflow and are not sent twice.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from pipeline.postprocessing import channel_argmax
from pipeline.tracking.safe import (
    case_label,
    dataset_root,
    filter_value,
    metric_name,
    public_uri,
    redact_config,
)
from pipeline.tracking.store import TrackingUnavailable, run_folder_id
from pipeline.training.checkpoints import SAVING_MID_EPOCH
from pipeline.visualisation import save_overlay_arrays

logger = logging.getLogger(__name__)

_LOST_URIS: set[str] = set()  # servers already reported lost in this process: report once
_STARTED_URIS: set[str] = set()  # servers a run of this process has started on
# Live validation trackers, so that the training's tracker can have the last overlays drawn at its end
_VALIDATION_TRACKERS: weakref.WeakSet[ValidationTracker] = weakref.WeakSet()
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
FOLDER_TAG = "run_folder"  # the random identity of the folder a run writes to (never its path)


def refused(error: Exception) -> bool:
    """Whether the server answered and refused this one request (a bad name or value, HTTP 4xx):
    other requests still succeed, so this is no lost server. Connection errors carry no such code."""
    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status != 429


class RunTracker(MLFlowHandler):
    """MLFlowHandler with run continuity, tags and graceful loss of the tracking server."""

    tags_resumption = True  # the engine that starts the run says whether it resumed

    def __init__(
        self,
        *,
        tags: Mapping[str, Any] | None = None,
        required: bool = True,
        log_epoch_time: bool = False,
        config_dir: str | None = None,
        run_folder: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tags = dict(tags or {})
        self.config_dir = config_dir
        self.run_folder = run_folder
        self.required = required
        self.log_epoch_time = log_epoch_time
        self._logged_params: dict[str, str] | None = None
        self._pending: list[Metric] = []
        self._last_steps: dict[str, float] | None = None  # per metric, the last step the run holds
        self._interrupted = False

    @property
    def uri(self) -> str:
        return str(self.client.tracking_uri)

    @property
    def run_id(self) -> str | None:
        return None if self.cur_run is None else self.cur_run.info.run_id

    @property
    def lost(self) -> bool:
        return self.uri in _LOST_URIS

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.TERMINATE, self.interrupted)
        engine.register_events(SAVING_MID_EPOCH)  # idempotent: TrainingCheckpoints fires it
        engine.add_event_handler(SAVING_MID_EPOCH, self._flush_safely)

    def start(self, engine: Engine) -> None:
        if self.lost:
            return
        try:
            self._set_experiment()
            self._reopen_named_run()
            super().start(engine)
            if self.tags_resumption:
                resumed = engine.state.iteration > 0
                self.client.set_tag(self.cur_run.info.run_id, "resumed", str(resumed).lower())
            for key, value in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, key, str(value))
            self._log_executed_config()
            _STARTED_URIS.add(self.uri)
        except Exception as error:
            # Once a run of this process reached the server (the trainer's), a later start (the
            # validator's, after metrics were buffered for an epoch) that fails has lost it mid-run.
            running = self.uri in _STARTED_URIS
            if self.required and not running:
                raise TrackingUnavailable(
                    f"MLflow tracking at {self.uri} cannot be used ({type(error).__name__}: {error}); "
                    "start the server, fix MLFLOW_TRACKING_URI / --tracking-uri, or pass --tracking-optional"
                ) from None
            self._give_up(error, "during the run" if running else "at start")

    def _log_executed_config(self) -> None:
        """The config MONAI saved for this run (``save_execute_config``): the newest config_*.json there.

        MONAI's own reference to that file breaks when ``output_dir`` is given as a plain path.
        """
        saved = (
            sorted(Path(self.config_dir).glob("config_*.json"), key=os.path.getmtime)
            if self.config_dir
            else []
        )
        if not saved:
            return
        config = json.loads(saved[-1].read_text())
        with tempfile.TemporaryDirectory() as folder:
            public = Path(folder) / saved[-1].name  # the original stays on disk for the user
            public.write_text(json.dumps(redact_config(config, dataset_root(config)), indent=4))
            self.client.log_artifact(self.cur_run.info.run_id, str(public), artifact_path="config")

    def _reopen_named_run(self) -> None:
        """Continue the run of this name written from this run folder, even a finished one: a resumed
        training is the same run. A run of that name from another folder is another run (MLflow
        allows repeated names), so a new one is created, tagged with this folder's identity."""
        if self.cur_run is not None or not self.run_name:
            return
        folder = run_folder_id(self.run_folder) if self.run_folder else None
        if folder is None:
            query = f"attributes.run_name = {filter_value(self.run_name)}"
        else:
            query = f"tags.{FOLDER_TAG} = {filter_value(folder)}"
        runs = self.client.search_runs([self.experiment.experiment_id], query)
        runs = [run for run in runs if run.info.run_name == self.run_name]
        if runs:
            self.cur_run = runs[0]
            if runs[0].info.status != "RUNNING":
                self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return
        tags = {FOLDER_TAG: folder} if folder else None
        experiment = self.experiment.experiment_id
        self.cur_run = self.client.create_run(experiment, run_name=self.run_name, tags=tags)
        self._last_steps = {}  # a new run holds nothing: no need to ask

    def _log_params(self, params: dict[str, Any]) -> None:
        """MLflow keeps a param's first value: a resumed run's changed one (more epochs, another
        learning rate) is recorded as the tag ``changed.<param>`` = ``old -> new``."""
        run_id = self.cur_run.info.run_id
        if self._logged_params is None:
            self._logged_params = dict(self.client.get_run(run_id).data.params)
        for key, value in params.items():
            if self._logged_params.get(key, str(value)) != str(value):
                self.client.set_tag(run_id, f"changed.{key}", f"{self._logged_params[key]} -> {value}")
        fresh = {key: value for key, value in params.items() if key not in self._logged_params}
        if fresh:
            super()._log_params(fresh)
            self._logged_params |= {key: str(value) for key, value in fresh.items()}

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Buffered until ``flush``; a buffer as large as one MLflow batch is sent at once."""
        timestamp = int(time.time() * 1000)
        flat = flatten_dict(metrics).items()
        self._pending += [Metric(metric_name(str(k)), v, timestamp, step or 0) for k, v in flat]
        if len(self._pending) >= MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics, except steps the run already holds (from before a kill)."""
        pending, self._pending = self._pending, []
        last = self._recorded_steps()
        fresh = []
        for metric in pending:
            if metric.step > last.get(metric.key, -math.inf):
                fresh.append(metric)
                last[metric.key] = metric.step
        for start in range(0, len(fresh), MAX_BATCH):
            self.client.log_batch(self.cur_run.info.run_id, metrics=fresh[start : start + MAX_BATCH])

    def _recorded_steps(self) -> dict[str, float]:
        """The last step of each metric of a reopened run, asked once per process."""
        if self._last_steps is None:
            run_id = self.cur_run.info.run_id
            keys = self.client.get_run(run_id).data.metrics
            self._last_steps = {
                key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-math.inf)
                for key in keys
            }
        return self._last_steps

    def iteration_completed(self, engine: Engine) -> None:
        self._safely(super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        self._safely(super().epoch_completed, engine)
        if self.log_epoch_time:
            seconds = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
            self._safely(self._log_metrics, {"epoch_time_s": seconds}, engine.state.epoch)
        self._safely(self.flush)

    def _flush_safely(self, _: Engine) -> None:
        self._safely(self.flush)

    def interrupted(self, _: Engine) -> None:
        """The engine was stopped (a signal): send what the checkpoint about to be written covers."""
        self._interrupted = True
        self._safely(self.flush)

    def complete(self) -> None:
        self._safely(self.flush)
        self._safely(super().complete)

    def close(self) -> None:
        """The run's end (``close_on_complete``: the trainer's, not the validator's): the validation
        trackers of this run draw their last overlays first. An interrupted run ends KILLED: MLflow's
        word for a run stopped before its end."""
        for tracker in list(_VALIDATION_TRACKERS):
            if tracker is not self and tracker.run_id is not None and tracker.run_id == self.run_id:
                tracker.draw_last_overlays()
        self._safely(self.flush)
        if self._interrupted:
            self.run_finish_status = RunStatus.to_string(RunStatus.KILLED)
        self._safely(super().close)

    def _safely(self, call: Callable[..., None], *args: Any) -> None:
        if self.lost or self.cur_run is None:
            return
        try:
            call(*args)
        except Exception as error:
            self._give_up(error, "during the run")

    def _give_up(self, error: Exception, when: str) -> None:
        if refused(error) and self.cur_run is not None:
            logger.warning(
                "MLflow tracking at %s refused a request %s (%s: %s); tracking goes on",
                public_uri(self.uri), when, type(error).__name__, error,
            )  # fmt: skip
            return
        self._pending.clear()
        if not self.lost:
            _LOST_URIS.add(self.uri)
            logger.warning(
                "MLflow tracking at %s lost %s (%s: %s); the run goes on and checkpoints are still written, "
                "but nothing more is tracked in this process",
                public_uri(self.uri), when, type(error).__name__, error,
            )  # fmt: skip


class ValidationTracker(RunTracker):
    """Per-class metrics under label names, the best value, per-case table and overlays (at the first
    validation, every ``overlay_every`` validations, and at the training's last: see ``complete``)."""

    tags_resumption = False  # a validator starts at the trainer's epoch: it cannot tell

    def __init__(
        self,
        *,
        label_names: Mapping[int, str],
        overlay_every: int = 5,
        overlay_cases: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.label_names = {int(k): v for k, v in label_names.items() if int(k) > 0}
        self.overlay_every = max(1, overlay_every)
        self.overlay_cases = overlay_cases
        self.validations = 0
        self._examples: list[dict[str, torch.Tensor]] = []
        self._case_names: list[str] = []
        self._step = 0  # the epoch of the last validation
        self._drawn_step: int | None = None  # the epoch whose overlays were drawn last
        _VALIDATION_TRACKERS.add(self)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget_examples)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_examples)

    def _forget_examples(self, _: Engine) -> None:
        self._examples.clear()
        self._case_names.clear()

    def _keep_examples(self, engine: Engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output, strict=False):
            self._case_names.append(case_label(str(item["image"].meta.get("filename_or_obj", "?"))))
            if len(self._examples) < self.overlay_cases:
                keep = {"image": item["image"], "label": output["label"], "pred": output["pred"]}
                self._examples.append({key: value.detach().cpu() for key, value in keep.items()})

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        self.validations += 1
        self._safely(self._record_details, engine)
        self._safely(self.flush)

    def _record_details(self, engine: Engine) -> None:
        step = engine.state.epoch
        table = per_case_table(engine, self.label_names, self._case_names)
        metrics = {
            f"best_{engine.state.key_metric_name}": float(engine.state.best_metric),
            **column_means(table),
        }
        self._log_metrics(metrics, step=step)
        self._step = step
        with tempfile.TemporaryDirectory() as folder:
            self._log_file(write_table(table, Path(folder) / "per_case_last_validation.csv"), "validation")
        if self.validations == 1 or self.validations % self.overlay_every == 0:
            self._draw_overlays()

    def draw_last_overlays(self) -> None:
        """The last validation's overlays, unless drawn already: a short training has its picture."""
        if self._examples and self._drawn_step != self._step:
            self._safely(self._draw_overlays)

    def _draw_overlays(self) -> None:
        self._drawn_step = self._step
        with tempfile.TemporaryDirectory() as folder:
            for index, example in enumerate(self._examples):
                png = Path(folder) / f"case{index}_epoch{self._step:04d}.png"
                self._log_file(draw_example(example, self.label_names, png), "overlays")

    def _log_file(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.cur_run.info.run_id, str(path), artifact_path=folder)


def per_case_table(engine: Engine, label_names: Mapping[int, str], cases: list[str]) -> list[dict[str, Any]]:
    """Rows of per-class Dice/IoU from the metric handlers' saved details (``save_details=True``)."""
    details = getattr(engine.state, "metric_details", None) or {}
    names = [label_names[index] for index in sorted(label_names)]
    rows: dict[int, dict[str, Any]] = {}
    for metric, values in details.items():
        short = "dice" if "dice" in metric else "iou" if "iou" in metric else metric
        for case, per_class in enumerate(torch.as_tensor(values).cpu().tolist()):
            row = rows.setdefault(case, {"case": cases[case] if len(cases) == len(values) else case})
            row.update({f"val_{short}_{name}": value for name, value in zip(names, per_class, strict=False)})
    return [rows[index] for index in sorted(rows)]


def column_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric column over the cases that have a value (NaN: class absent in both)."""
    means = {}
    for column in rows[0] if rows else {}:
        values = [
            float(row[column]) for row in rows if column != "case" and not math.isnan(float(row[column]))
        ]
        if values:
            means[column] = sum(values) / len(values)
    return means


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def draw_example(example: Mapping[str, torch.Tensor], label_names: Mapping[int, str], png: Path) -> Path:
    """Image, ground truth and prediction of one validation case (in the network's space), from memory."""

    def classes(volume: torch.Tensor) -> np.ndarray:  # one-hot channels or one channel of indices
        return np.asarray(channel_argmax(volume) if volume.shape[0] > 1 else volume[0])

    affine = np.asarray(getattr(example["image"], "affine", torch.eye(4)), dtype=float)
    image = np.asarray(example["image"][0], dtype=np.float32)
    truth, pred = classes(example["label"]), classes(example["pred"])
    return save_overlay_arrays(image, pred, affine, png, label=truth, label_names=label_names, title=png.stem)
