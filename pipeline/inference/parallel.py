"""One batch of cases segmented by several worker processes (``medseg infer --nproc N``).

Each worker is a fresh ``python -m monai.bundle run`` of the same inference config over its share of
the cases, so it behaves as a one-process run does (atomic writes, a failing case skipped), and a
worker that dies takes only its own cases with it. A worker gets one GPU when there are GPUs (its
``CUDA_VISIBLE_DEVICES``) and its share of the CPU cores (``OMP_NUM_THREADS``) either way, so that N
workers never run N times as many threads as there are cores.

What needs the whole batch is decided before the split by the caller (``pipeline.workflows.infer``):
which cases are left, their output names (so two workers never write one file), which inputs are
refused. The batch is one MLflow run, recorded here by the inference config's own tracker
(``tracking.yaml``'s ``evaluator``) on an ignite engine whose iterations are the workers; the workers
run untracked and report their failures in a JSON file each (``SkipFailedCases.failures_file``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from pipeline.bundle_parser import bundle_parser
from pipeline.inference.batch import Failure, read_failures
from pipeline.paths import LOGGING_FILE, TRACKING_FILE, bundle_dir, config_files, meta_files
from pipeline.tracking import RunTracker
from pipeline.tracking.safe import case_label, redact_config
from pipeline.training.distributed import data_loader_workers

logger = logging.getLogger(__name__)

BATCH_TRACKER = "batch_tracker"  # the id under which the parent parses tracking.yaml's evaluator tracker
FAILURES_ARTIFACT = "failed_cases.json"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (or their indices)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return named[:count] if named else [str(index) for index in range(count)]


def require_workers(nproc: int) -> None:
    """``nproc`` workers fit this machine: at least one, and on a GPU machine one GPU each."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give one worker process or more")
    gpus = visible_gpus() if nproc > 1 else []
    if gpus and nproc > len(gpus):
        raise ValueError(
            f"--nproc {nproc}: this machine has {len(gpus)} GPU(s) and each worker takes one; "
            f"give --nproc {len(gpus)} or fewer"
        )


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_environments(workers: int) -> list[dict[str, str]]:
    """Each worker's environment beyond this process's: one GPU each when there are GPUs, and its
    share of the cores for PyTorch's threads (at least one) either way."""
    threads = str(max(1, usable_cores() // workers))
    shared = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    gpus = visible_gpus()
    if not gpus:
        return [dict(shared) for _ in range(workers)]
    return [{**shared, "CUDA_VISIBLE_DEVICES": gpus[index]} for index in range(workers)]


def split_cases(cases: Sequence[Mapping[str, Any]], workers: int) -> list[list[Mapping[str, Any]]]:
    """Round robin: case i goes to worker i mod N, so a folder sorted by name (often by site or size)
    spreads its large scans over the workers rather than giving them all to one."""
    return [list(cases[index::workers]) for index in range(workers)]


@dataclass
class Worker:
    """One worker process over its cases; ``wait`` gives their failures, in words when it died."""

    command: list[str]
    env: dict[str, str]
    cases: list[Mapping[str, Any]]
    failures_file: Path
    label: str  # "worker 2 of 4", for the messages
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env={**os.environ, **self.env})

    def wait(self) -> list[Failure]:
        status = self.process.wait() if self.process else None
        if self.failures_file.is_file():
            return read_failures(self.failures_file)
        why = (
            f"{self.label} stopped (exit status {status}) before reporting on its cases (its log is "
            "above); a rerun segments the cases it left"
        )
        logger.error("%s", why)
        return [Failure(str(case["image"]), why) for case in self.cases]

    def stop(self) -> None:
        """Ends the process if it still runs (the parent is stopping: no orphan keeps computing)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def worker_arguments(
    name: str, keys: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], failures_file: Path, threads: int
) -> dict[str, Any]:
    """``monai.bundle run``'s arguments for one worker (an ``args_file``: no command line length limit
    on a long list of inputs): the batch's keys, with this worker's cases and their batch names, and
    data-loader workers for its share of the cores unless the keys set them."""
    return {
        "meta_file": meta_files(name),
        "config_file": config_files(name, "inference"),
        "logging_file": str(LOGGING_FILE),
        "bundle_root": str(bundle_dir(name)),
        **keys,
        "input": [str(case["image"]) for case in cases],
        "case_names": [case["case_name"] for case in cases],
        "failures_file": str(failures_file),
        "num_workers": keys.get("num_workers", data_loader_workers(threads)),
    }


def make_workers(
    name: str, cases: Sequence[Mapping[str, Any]], keys: Mapping[str, Any], nproc: int, folder: Path
) -> list[Worker]:
    """At most ``nproc`` workers (no more than cases), their argument files written into ``folder``."""
    chunks = split_cases(cases, min(nproc, len(cases)))
    workers = []
    for index, (chunk, env) in enumerate(zip(chunks, worker_environments(len(chunks)), strict=True)):
        failures_file, args_file = folder / f"failures_{index}.json", folder / f"worker_{index}.json"
        arguments = worker_arguments(name, keys, chunk, failures_file, int(env["OMP_NUM_THREADS"]))
        args_file.write_text(json.dumps(arguments, indent=1, default=os.fspath))
        command = [sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args_file)]
        workers.append(Worker(command, env, chunk, failures_file, f"worker {index + 1} of {len(chunks)}"))
    return workers


def batch_tracker(name: str, keys: Mapping[str, Any], nproc: int) -> RunTracker:
    """The tracker a one-process run would attach (tracking.yaml's ``evaluator``, its params the
    config's ``tracked_params``), parsed here for the whole batch, with ``nproc`` among its params.
    The executed config is saved in the output folder for it, as MONAI's tracking does in one process."""
    parser = bundle_parser(name, "inference", keys)
    tracking = ConfigParser.load_config_file(str(TRACKING_FILE))
    for key, value in tracking["configs"].items():
        if key not in tracking["handlers_id"]:
            parser[key] = value
    parser[BATCH_TRACKER] = tracking["configs"]["evaluator"]
    parser["tracked_params::nproc"] = nproc
    output_dir = Path(parser.get_parsed_content("output_dir"))
    output_dir.mkdir(parents=True, exist_ok=True)
    parser.export_config_file(parser.get(), str(output_dir / f"config_{time.strftime('%Y%m%d_%H%M%S')}.json"))
    return parser.get_parsed_content(BATCH_TRACKER)


def public_failures(failures: Sequence[Failure], keys: Mapping[str, Any]) -> list[dict[str, str]]:
    """What MLflow may hold of the failures: each case by its public label, and each reason with the
    absolute paths of the batch's config (inputs, output folder, checkpoint) and any quoted absolute
    path redacted, as ``redact_config`` redacts them in expressions."""
    rows = [{"case": case_label(failure.case), "reason": failure.reason} for failure in failures]
    return redact_config({"failures": rows, "config": dict(keys)})["failures"]


def run_workers(
    workers: Sequence[Worker], tracker: RunTracker | None, keys: Mapping[str, Any], folder: Path
) -> list[Failure]:
    """Start the workers (once the tracker's run exists), wait for each and combine their failures.

    The engine's iterations are the workers, so the tracker records the batch as it records a
    one-process run: params at the start, the metric ``failed_cases`` at the end, and the failures
    (``failed_cases.json``, no paths) as an artifact.
    """
    failures: list[Failure] = []

    def finish(engine: Engine, worker: Worker) -> None:
        failures.extend(worker.wait())
        engine.state.metrics["failed_cases"] = len(failures)

    def record_failures(_: Engine) -> None:
        if tracker is not None and failures:
            report = folder / FAILURES_ARTIFACT
            report.write_text(json.dumps(public_failures(failures, keys), indent=1))
            tracker.artifacts = (*tracker.artifacts, str(report))

    engine = Engine(finish)
    if tracker is not None:
        tracker.attach(engine)
    engine.add_event_handler(Events.STARTED, lambda _: [worker.start() for worker in workers])
    engine.add_event_handler(Events.EPOCH_COMPLETED, record_failures)  # before the tracker's COMPLETED
    try:
        engine.run(list(workers), max_epochs=1)
    finally:
        for worker in workers:
            worker.stop()
    return failures


def segment_in_workers(
    name: str, cases: Sequence[Mapping[str, Any]], keys: Mapping[str, Any], nproc: int, tracking: bool
) -> list[Failure]:
    """Segment ``cases`` (each with its ``case_name``, its image an absolute path) over at most
    ``nproc`` worker processes; the failures of all of them. ``keys`` are the whole batch's config keys,
    as ``run_workflow`` takes them; the MLflow run records the number of workers as ``nproc``."""
    tracker = batch_tracker(name, keys, min(nproc, len(cases))) if tracking else None
    with tempfile.TemporaryDirectory(prefix="medseg-workers-") as folder:
        workers = make_workers(name, cases, keys, nproc, Path(folder))
        return run_workers(workers, tracker, keys, Path(folder))
