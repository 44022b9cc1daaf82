"""``medseg compare``: race bundles on the user's own data with one budget and one seed, and rank them.

Every bundle trains on the same cases (per fold) with the same epochs or wall-clock minutes, and is
scored on the same held-out cases: the labelled test cases, or with ``folds`` > 1 each fold's
validation cases (k-fold cross-validation). Each training and evaluation runs in its own process,
so its wall time and peak memory are its own and a failing bundle cannot take the race down.

MLflow: one parent run for the comparison; each bundle's training run (per fold) is its child and
carries the held-out metrics, and that bundle's evaluation runs are nested under it.

What is done is recorded in ``compare.json`` in the output folder as it happens: rerunning the same
command resumes and never trains a finished bundle again. The record holds the settings its results
were made under (budget, folds, datalist, overrides); a rerun with other settings is refused rather
than ranking old results under the new budget's title.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline import workflows
from pipeline.data.datalist import cases, dataset_name
from pipeline.evaluation import evaluate_predictions
from pipeline.evaluation.leaderboard import Entry, case_means, ranked, write_leaderboard
from pipeline.io.atomic import atomic_write
from pipeline.io.checkpoint import load_checkpoint, network_weights
from pipeline.planning.plan import PLAN_FILE
from pipeline.tracking import default_tracking_uri, git_commit, new_run_name
from pipeline.tracking.runs import find_run_id
from pipeline.tracking.store import ensure_experiment
from pipeline.training.run_folder import LATEST_FILE
from pipeline.workflows import bundle_dir, require_valid_data

DEFAULT_BUNDLES = ("unet3d", "resunet", "attention_unet", "unetr", "multiresunet")
STATE_FILE = "compare.json"
PARENT_TAG = "mlflow.parentRunId"  # what makes MLflow's UI nest a run under another
# Overrides that name where results are recorded, not how they are made: a resume may change them.
UNRECORDED_OVERRIDES = ("run_name", "tracking_uri", "experiment_name", "tracking_required")
BUDGET_KEYS = ("epochs", "minutes", "folds")


class JobFailed(RuntimeError):
    """A compare job's child process exited non-zero; names the job, so the CLI can say which."""

    def __init__(self, job: str, returncode: int) -> None:
        super().__init__(f"compare job {job} exited with {returncode}")
        self.job, self.returncode = job, returncode


@dataclass
class Comparison:
    """What to race and where; ``state`` is the record of finished jobs, kept in ``compare.json``."""

    datalist: Path
    output_dir: Path
    bundles: tuple[str, ...] = DEFAULT_BUNDLES
    epochs: int | None = None
    minutes: float | None = None
    folds: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    tta: bool = True
    ensemble: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    plan: bool = True  # each bundle plans its run folder from the data, the machine and the minutes

    @property
    def state_path(self) -> Path:
        return self.output_dir / STATE_FILE

    def load_state(self) -> None:
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())

    def save_state(self) -> None:
        with atomic_write(self.state_path) as handle:
            handle.write(json.dumps(self.state, indent=2).encode())

    def job_dir(self, bundle: str, fold: int) -> Path:
        return self.output_dir / bundle / f"fold{fold}"

    def settings(self) -> dict[str, Any]:
        """What the recorded results depend on; ``tta``, ``ensemble`` and the bundle list only add rows.
        The datalist and the overrides are digests: compare.json is an MLflow artifact, and they may
        hold paths."""
        overrides = {k: v for k, v in self.overrides.items() if k not in UNRECORDED_OVERRIDES}
        return {
            "epochs": self.epochs,
            "minutes": self.minutes,
            "folds": self.folds,
            "datalist": _digest(self.datalist.read_bytes()),
            "overrides": _digest(json.dumps(overrides, sort_keys=True, default=str).encode()),
        }

    def require_same_settings(self) -> None:
        """Resume only under the settings the recorded results were made with."""
        current, recorded = self.settings(), self.state.get("settings")
        if recorded is None and not self.state.get("jobs"):
            self.state["settings"] = current
            return
        recorded = recorded or {}  # results of an older medseg, which did not record its settings
        changed = [key for key in current if recorded.get(key) != current[key]]
        if changed:
            was = [f"{k} {recorded[k]}" if k in BUDGET_KEYS and k in recorded else k for k in changed]
            raise ValueError(
                f"{self.state_path} holds results made under other settings ({', '.join(was)}); rerun with "
                "those settings to resume, or give another --output for a new comparison"
            )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Measured:
    """A finished job's wall time and the peak resident memory of its process."""

    seconds: float
    peak_gib: float


def run_measured(command: Sequence[str], job: str) -> Measured:
    """Run a command; its own peak RSS comes from ``wait4`` (ru_maxrss is in KiB on Linux)."""
    started = time.perf_counter()
    process = subprocess.Popen(list(command))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise JobFailed(job, process.returncode)
    return Measured(time.perf_counter() - started, usage.ru_maxrss / 2**20)


def run_job(comparison: Comparison, key: str, function: str, **kwargs: Any) -> dict[str, float]:
    """Run ``pipeline.workflows.<function>(**kwargs)`` in a child process once; later calls with the
    same ``key`` return the recorded measurement instead."""
    jobs = comparison.state.setdefault("jobs", {})
    if key in jobs:
        return jobs[key]
    spec = comparison.output_dir / "jobs" / f"{key.replace('/', '_')}.json"
    with atomic_write(spec) as handle:
        handle.write(json.dumps({"function": function, "kwargs": kwargs}, default=str, indent=2).encode())
    measured = run_measured([sys.executable, "-m", "pipeline.compare", str(spec)], key)
    jobs[key] = {"seconds": measured.seconds, "peak_gib": measured.peak_gib}
    comparison.save_state()
    return jobs[key]


def _run_spec(path: str) -> None:
    """The child side of ``run_job``."""
    spec = json.loads(Path(path).read_text())
    getattr(workflows, spec["function"])(**spec["kwargs"])


def held_out_split(datalist: Path, folds: int) -> str:
    """Labelled test cases when there are some and no cross-validation, else the validation fold."""
    if folds == 1 and any("label" in case for case in cases(datalist, role="test")):
        return "test"
    return "validation"


def open_parent_run(comparison: Comparison, client: Any, experiment: str) -> str:
    """The comparison's MLflow run: created once, reopened when the comparison resumes."""
    if "parent_run_id" in comparison.state:
        client.update_run(comparison.state["parent_run_id"], status="RUNNING")
        return comparison.state["parent_run_id"]
    experiment_id = ensure_experiment(client, experiment)
    name = comparison.overrides.pop("run_name", None) or new_run_name("compare")
    run = client.create_run(
        experiment_id, run_name=name, tags={"workflow": "compare", "git_commit": git_commit()}
    )
    budget = {"epochs": comparison.epochs, "minutes": comparison.minutes, "folds": comparison.folds}
    for key, value in {**budget, "bundles": ",".join(comparison.bundles)}.items():
        client.log_param(run.info.run_id, key, value)
    comparison.state.update(parent_run_id=run.info.run_id, name=name, experiment=experiment)
    comparison.save_state()
    return run.info.run_id


def train_bundle(comparison: Comparison, bundle: str, fold: int, parent_id: str) -> dict[str, float]:
    """One bundle on one fold, as a child run of the comparison."""
    overrides = {
        **comparison.overrides,
        "val_fold": fold,
        "run_name": f"{comparison.state['name']}-{bundle}-fold{fold}",
        f"tracked_tags::{PARENT_TAG}": parent_id,
    }
    if comparison.minutes is not None:
        overrides["time_budget_minutes"] = comparison.minutes
    if comparison.plan and fold:
        share_plan(comparison.job_dir(bundle, 0), comparison.job_dir(bundle, fold))
    return run_job(
        comparison,
        f"{bundle}/fold{fold}/train",
        "train",
        name=bundle,
        datalist=str(comparison.datalist),
        output_dir=str(comparison.job_dir(bundle, fold)),
        epochs=comparison.epochs,
        overrides=overrides,
        check_data=False,
        plan=comparison.plan,
        minutes=comparison.minutes,
    )


def share_plan(first: Path, other: Path) -> None:
    """Plan once per bundle: the plan is made from every labelled case, so it is the same for each
    fold, and a fold's run folder starts with fold 0's (a fold already begun keeps its own)."""
    if (first / PLAN_FILE).is_file() and not (other / PLAN_FILE).exists():
        with atomic_write(other / PLAN_FILE) as handle:
            handle.write((first / PLAN_FILE).read_bytes())


def evaluate_bundle(
    comparison: Comparison, bundle: str, fold: int, train_run_id: str, tta: bool
) -> tuple[Path, dict[str, float]]:
    """Score one trained bundle on the held-out cases, nested under its training run."""
    suffix = "-tta" if tta else ""
    output = comparison.job_dir(bundle, fold) / f"evaluation{suffix}"
    overrides = {
        **comparison.overrides,
        "val_fold": fold,
        "tta": tta,
        "run_name": f"{comparison.state['name']}-{bundle}-fold{fold}-eval{suffix}",
        f"tracked_tags::{PARENT_TAG}": train_run_id,
    }
    measured = run_job(
        comparison,
        f"{bundle}/fold{fold}/evaluate{suffix}",
        "evaluate",
        name=bundle,
        datalist=str(comparison.datalist),
        output_dir=str(output),
        checkpoint=str(comparison.job_dir(bundle, fold) / "models" / "model.pt"),
        split=held_out_split(comparison.datalist, comparison.folds),
        overrides=overrides,
    )
    return output, measured


def ensemble_bundles(
    comparison: Comparison, members: Sequence[str], fold: int
) -> tuple[Path, dict[str, float]]:
    """Average the softmax of the members' checkpoints on the held-out cases, then score it."""
    name = "+".join(members)
    folder = comparison.output_dir / f"ensemble_{name}" / f"fold{fold}"
    split = held_out_split(comparison.datalist, comparison.folds)
    images = [c["image"] for c in cases(comparison.datalist, role=split, val_fold=fold)]
    checkpoints = [str(comparison.job_dir(m, fold) / "models" / "model.pt") for m in members]
    measured = run_job(
        comparison,
        f"ensemble_{name}/fold{fold}/infer",
        "infer_ensemble",
        names=list(members),
        checkpoints=checkpoints,
        inputs=images,
        output_dir=str(folder / "predictions"),
        overrides={**comparison.overrides, "tracking_required": False},
        tracking=False,
    )
    output = folder / "evaluation"
    evaluate_predictions(folder / "predictions", comparison.datalist, output, split=split, val_fold=fold)
    return output, measured


def parameter_count(checkpoint: Path) -> int:
    """Counted from the trained weights, so it is the network as trained (user overrides included)."""
    state = network_weights(load_checkpoint(checkpoint))
    return int(sum(tensor.numel() for tensor in state.values()))


def epochs_trained(models: Path) -> int:
    """The epoch the training ended at (a time budget decides it), from its latest checkpoint."""
    state = load_checkpoint(models / LATEST_FILE)
    trainer = state["trainer"]  # ignite's state_dict: iterations, not epochs
    return int(trainer["iteration"]) // max(1, int(trainer["epoch_length"]))


def failure_note(error: Exception) -> str:
    """A leaderboard cell for a failed step: no message text, which may hold paths (it is an artifact)."""
    if isinstance(error, JobFailed):
        return f"{error.job.rpartition('/')[2]} exited with {error.returncode}"
    return f"failed ({type(error).__name__})"


def report_failure(what: str, error: Exception) -> None:
    print(f"medseg compare: {what} failed ({error}); going on", file=sys.stderr)


def race_fold(comparison: Comparison, fold: int, client: Any, board: dict[str, Any]) -> None:
    """Train and score every bundle on one fold; a bundle that fails is reported, not fatal.

    Any error of one bundle's steps (its processes, the MLflow look-up of its run, reading its
    results) is caught: after hours of racing, the other rows must still reach the leaderboard."""
    for bundle in comparison.bundles:
        try:
            trained = train_bundle(comparison, bundle, fold, comparison.state["parent_run_id"])
            run_name = f"{comparison.state['name']}-{bundle}-fold{fold}"
            train_run = find_run_id(client, comparison.state["experiment"], run_name)
            for tta in (False, True) if comparison.tta else (False,):
                output, measured = evaluate_bundle(comparison, bundle, fold, train_run, tta)
                entry = board.setdefault(
                    bundle + (" + TTA" if tta else ""),
                    Entry(bundle + (" + TTA" if tta else ""), tta=tta),
                )
                entry.add_fold(case_means(output), trained, measured)
                models = comparison.job_dir(bundle, fold) / "models"
                entry.parameters = parameter_count(models / "model.pt")
                entry.epochs.append(epochs_trained(models))
            log_held_out(client, train_run, board[bundle].per_fold[-1])
        except Exception as error:  # recorded in the bundle's row, see the docstring
            board.setdefault(bundle, Entry(bundle)).failure = failure_note(error)
            report_failure(f"{bundle} fold {fold}", error)


def log_held_out(client: Any, run_id: str, means: Mapping[str, float]) -> None:
    """The held-out metrics on the bundle's child run, so MLflow's compare view lines them up."""
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"heldout_{key}", float(value), stamp, 0) for key, value in means.items()]
    client.log_batch(run_id, metrics=metrics)


def add_ensemble(comparison: Comparison, board: dict[str, Any]) -> None:
    """The ensemble of the two best plain bundles, as one more row."""
    plain = [entry for entry in ranked(board.values()) if not entry.tta and not entry.failure]
    if len(plain) < 2:
        return
    members = [plain[0].name, plain[1].name]
    entry = Entry(f"ensemble {' + '.join(members)}")
    board[entry.name] = entry
    try:
        for fold in range(comparison.folds):
            output, measured = ensemble_bundles(comparison, members, fold)
            entry.add_fold(case_means(output), None, measured)
    except Exception as error:  # the trained rows must still reach the leaderboard
        entry.failure = failure_note(error)
        report_failure(entry.name, error)
        return
    entry.parameters = sum(plain[i].parameters or 0 for i in range(2))


def compare(
    datalist: str | Path,
    output_dir: str | Path,
    bundles: Sequence[str] = DEFAULT_BUNDLES,
    epochs: int | None = None,
    minutes: float | None = None,
    folds: int = 1,
    overrides: Mapping[str, Any] | None = None,
    tta: bool = True,
    ensemble: bool = True,
    plan: bool = True,
) -> Path:
    """Race the bundles; returns the leaderboard's Markdown file (an HTML twin lies beside it).
    Each bundle is planned (``plan.yaml`` in its run folder, for ``minutes``) unless ``plan`` is False."""
    if epochs is None and minutes is None:
        raise ValueError("give a budget: --epochs N or --minutes M (the same for every bundle)")
    if folds < 1:
        raise ValueError(f"--folds must be 1 or more, not {folds}")
    for bundle in bundles:
        bundle_dir(bundle)  # an unknown name fails now, not after hours of racing
    comparison = Comparison(
        Path(datalist).resolve(), Path(output_dir).resolve(), tuple(bundles), epochs, minutes, folds,
        dict(overrides or {}), tta, ensemble, plan=plan,
    )  # fmt: skip
    split = held_out_split(comparison.datalist, folds)
    roles = ("train", "validation", "test") if split == "test" else ("train", "validation")
    require_valid_data(comparison.datalist, roles, comparison.overrides)
    comparison.output_dir.mkdir(parents=True, exist_ok=True)
    comparison.load_state()
    comparison.require_same_settings()
    client = MlflowClient(comparison.overrides.get("tracking_uri") or default_tracking_uri())
    experiment = comparison.overrides.get("experiment_name") or dataset_name(comparison.datalist)
    comparison.overrides.setdefault("experiment_name", experiment)
    parent = open_parent_run(comparison, client, experiment)
    board: dict[str, Any] = {}
    for fold in range(folds):
        race_fold(comparison, fold, client, board)
    if ensemble:
        add_ensemble(comparison, board)
    markdown, html = write_leaderboard(
        list(board.values()), comparison.output_dir, describe_budget(comparison, split)
    )
    for path in (markdown, html, comparison.state_path):
        client.log_artifact(parent, str(path))
    failed = any(entry.failure for entry in board.values())
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return markdown


def describe_budget(comparison: Comparison, split: str) -> str:
    parts = [f"{comparison.epochs} epochs" if comparison.epochs else ""]
    parts.append(f"{comparison.minutes:g} min per bundle" if comparison.minutes else "")
    if comparison.folds > 1:
        folds = f"{comparison.folds}-fold cross-validation"
    elif split == "test":
        folds = "the labelled test cases"
    else:
        folds = "the validation cases of fold 0 (the datalist has no labelled test cases)"
    seed = comparison.overrides.get("seed", 0)
    return f"budget: {', '.join(p for p in parts if p)}; scored on {folds}; seed {seed}"


if __name__ == "__main__":
    _run_spec(sys.argv[1])
