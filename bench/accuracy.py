"""``make bench-accuracy``: held-out accuracy of every bundle at one time budget, planned from the data
against the bundle's defaults; writes ``bench/accuracy.json`` and prints a markdown table.

Per bundle, two arms, each trained in its own process exactly as a user would type it:

* ``planned``: ``medseg train B --data split.json --minutes M`` (no other argument);
* ``defaults``: ``medseg train B --data split.json --no-plan time_budget_minutes=M`` (before the plan),

then ``medseg evaluate B --split test`` on the held-out cases. The data: a fixed, seeded split of the
shared MSD hippocampus cases (40 held out, the rest trained on in 5 folds, validation fold 0), written
as a datalist under ``data/cache/bench-accuracy/`` that points at the shared files (none is copied),
and the MNI demo data (``data/prepare_mni_brain.py``; skipped, and said so, when absent).

"train min" is the training process's wall-clock time: the data check and the plan's probes count, as
they do for a user. MLflow records go to a SQLite store in the work folder, never to the project's.
A finished arm (its ``metrics.json`` present) is not redone on a rerun, so an interrupted benchmark
goes on where it stopped; ``--fresh`` redoes the chosen bundles. ``--quick`` is a smoke test of the
harness: six cases, tiny networks, 0.2 minutes, one bundle.

    .venv/bin/python -m bench.accuracy [--bundles unet3d resunet] [--minutes 10] [--quick] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from monai.utils import path_to_sqlite_uri

from bench import machine
from bench.run import bundle_overrides
from pipeline.data.datalist import cases, read_json
from pipeline.data.mni_brain import datalist_is_valid
from pipeline.io.atomic import atomic_write
from pipeline.io.checkpoint import load_checkpoint
from pipeline.paths import volume_bundles
from pipeline.planning.plan import NETWORK_KEYS, PLAN_FILE
from pipeline.workflows import workflow_setting

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "dataset.json"
MNI = ROOT / "data" / "mni_brain" / "datalist.json"
WORK = ROOT / "data" / "cache" / "bench-accuracy"  # git-ignored: the split, the run folders, MLflow
ARMS = ("planned", "defaults")
NUM_FOLDS = 5
SPLIT_FILE = "hippocampus_split.json"
TRAIN_RECORD = "bench_train.json"  # written once the arm's training process ended well
EVAL_DIR = "eval_test"
# --quick: patch 32^3 and the depth-4 strides (and kernels) the tiny widths need, whatever the plan chose.
QUICK_NETWORK = {
    "resunet": {"strides": [2, 2, 2, 2]},
    "attention_unet": {"strides": [2, 2, 2, 2]},
    "unet3d": {"strides": [2, 2, 2, 2], "kernel_sizes": [3] * 5},
}
TARGET_DICE = 0.85  # issue 15: planned unet3d on the hippocampus split, 10 minutes, 2 cores
# --levers: issue 15's recipe levers, each one change to the planned arm at the same budget (unet3d).
LEVERS: dict[str, dict[str, Any]] = {
    "sgd-poly": {  # nnU-Net's optimiser: SGD, Nesterov momentum 0.99, lr 1e-2, poly(0.9) decay
        "optimizer": "@sgd_optimizer",
        "lr_scheduler": "@poly_schedule",
        "learning_rate": 0.01,
        "weight_decay": 3.0e-5,
    },
    "batch-dice": {"loss::batch": True},  # Dice over the batch as one volume, as nnU-Net for 3D
    "no-deep-supervision": {"deep_supervision": False},  # unet3d's default is on
    "fg-third": {"crop_foreground_ratio": 0.33},  # nnU-Net forces a third of the patches onto foreground
}


@dataclass
class Arm:
    """One training and its held-out evaluation: a bundle on a dataset, planned or on its defaults."""

    dataset: str
    bundle: str
    arm: str
    datalist: Path
    folder: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> Path:
        return self.folder / EVAL_DIR / "metrics.json"


def case_name(path: str | Path) -> str:
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def hippocampus_split(dataset: Path, seed: int, num_test: int, num_train: int | None) -> dict:
    """The fixed split as a datalist: seeded shuffle of the labelled cases in name order, the first
    ``num_test`` held out, the next ``num_train`` (default: all the rest) in folds by position. Absolute
    paths to the shared files: this datalist is a local file, never logged or copied."""
    header = {key: value for key, value in read_json(dataset).items() if key not in ("training", "test")}
    labelled = sorted(cases(dataset, role="all"), key=lambda case: case_name(case["image"]))
    random.Random(seed).shuffle(labelled)
    test = labelled[:num_test]
    train = labelled[num_test:] if num_train is None else labelled[num_test : num_test + num_train]
    if not test or len(train) < 2:
        raise ValueError(f"{dataset}: {len(labelled)} labelled cases cannot give {num_test} test and "
                         f"{num_train or 'the other'} training cases")  # fmt: skip

    def entry(case: dict, fold: int | None = None) -> dict:
        item = {"image": str(case["image"]), "label": str(case["label"])}
        return item if fold is None else {**item, "fold": fold}

    return {
        **header,
        "description": f"bench.accuracy split of {dataset.parent.name}: seed {seed}, {len(test)} held out",
        "numTraining": len(train),
        "numTest": len(test),
        "training": [entry(case, index % NUM_FOLDS) for index, case in enumerate(train)],
        "test": [entry(case) for case in test],
    }


def split_names(datalist: dict) -> dict[str, list[str]]:
    """Case names per role: what accuracy.json records, to tell a rerun it meets the same split."""
    return {
        "train": [case_name(case["image"]) for case in datalist["training"]],
        "test": [case_name(case["image"]) for case in datalist["test"]],
    }


def write_split(split: dict, path: Path, runs: Path, fresh: bool) -> None:
    """Write the split datalist (only when it changed, so the plan's fingerprint cache stays valid).
    Finished arms trained on another split are refused: their figures would not compare."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before == split:
            return
        if split_names(before) != split_names(split) and runs.is_dir() and not fresh:
            raise ValueError(f"{path} holds another split than this one (other cases, seed or sizes) and "
                             f"{runs} has arms trained on it: rerun with --fresh to redo them")  # fmt: skip
        shutil.rmtree(runs, ignore_errors=True)
    with atomic_write(path) as handle:
        handle.write((json.dumps(split, indent=2) + "\n").encode())


def tracking_args(work: Path) -> list[str]:
    store = work / "mlflow" / "mlruns.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    return ["--tracking-uri", path_to_sqlite_uri(str(store)), "--tracking-optional"]


def train_command(arm: Arm, minutes: float, tracking: list[str]) -> list[str]:
    budget = (
        ["--minutes", str(minutes)]
        if arm.arm.startswith("planned")
        else ["--no-plan", f"time_budget_minutes={minutes}"]
    )
    extra = [f"{key}={json.dumps(value)}" for key, value in arm.overrides.items()]
    return [sys.executable, "-m", "pipeline.cli", "train", arm.bundle, "--data", str(arm.datalist),
            "--output", str(arm.folder), *budget, *tracking, *extra]  # fmt: skip


def evaluate_command(arm: Arm, tracking: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "evaluate", arm.bundle, "--data", str(arm.datalist),
            "--split", "test", "--checkpoint", str(arm.folder / "models" / "model.pt"),
            "--output", str(arm.folder / EVAL_DIR), *tracking]  # fmt: skip


def run_logged(command: list[str], log: Path, work: Path) -> float:
    """Run one medseg step with its output in ``log``; minutes it took. A failure names the log and
    ends with its last lines, since the step's own one-line error is there."""
    env = {**os.environ, "MEDSEG_HOME": str(work)}  # anything without a place of its own stays in work
    env.pop("MLFLOW_TRACKING_URI", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("a") as handle:
        done = subprocess.run(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"{command[3]} exited with {done.returncode}; see {log}:\n{tail}")
    return (time.perf_counter() - started) / 60


def run_arm(arm: Arm, minutes: float, work: Path) -> dict[str, Any]:
    """Train (unless a record says it ended well), evaluate (unless metrics.json is there), then the row."""
    tracking = tracking_args(work)
    record = arm.folder / TRAIN_RECORD
    trained_for = json.loads(record.read_text())["budget_min"] if record.is_file() else minutes
    if trained_for != minutes:  # its figures would sit in a table of another budget
        raise RuntimeError(
            f"{arm.folder} was trained for {trained_for} min, not {minutes}: rerun with --fresh"
        )
    if not arm.metrics.is_file():
        if not record.is_file():
            say(f"{arm.dataset} {arm.bundle} {arm.arm}: training {minutes} min, log in {arm.folder}")
            took = run_logged(train_command(arm, minutes, tracking), arm.folder / "train.log", work)
            with atomic_write(record) as handle:
                handle.write(json.dumps({"train_min": round(took, 2), "budget_min": minutes}).encode())
        say(f"{arm.dataset} {arm.bundle} {arm.arm}: evaluating the held-out cases")
        run_logged(evaluate_command(arm, tracking), arm.folder / "evaluate.log", work)
    row = {"dataset": arm.dataset, "bundle": arm.bundle, "arm": arm.arm, **scores(arm.metrics)}
    row.update(json.loads(record.read_text()) if record.is_file() else {})
    row.update(progress(arm.folder / "models" / "latest.pt"))
    row["settings"] = settings(arm)
    return row


def scores(metrics: Path) -> dict[str, Any]:
    """Held-out means from ``metrics.json``'s primary variant: Dice per class, mean Dice, mean IoU."""
    document = json.loads(metrics.read_text())
    summary = document["variants"][document["primary"]]["summary"]
    per_class = {name: round(stats["dice"]["mean"], 4) for name, stats in summary.items() if name != "mean"}
    return {
        "dice": per_class,
        "dice_mean": round(summary["mean"]["dice"]["mean"], 4),
        "iou_mean": round(summary["mean"]["iou"]["mean"], 4),
        "test_cases": len(document["variants"][document["primary"]]["cases"]),
    }


def progress(latest: Path) -> dict[str, Any]:
    """Epochs and iterations the training made, and its best validation, from its last training state."""
    if not latest.is_file():
        return {"epochs": None, "iterations": None}
    state = load_checkpoint(latest)
    trainer = state.get("trainer", {})
    iterations, length = trainer.get("iteration"), trainer.get("epoch_length")
    return {
        "epochs": round(iterations / length, 2)
        if iterations is not None and length
        else trainer.get("epoch"),
        "iterations": iterations,
        "best_val_dice": round(float(state["best_metric"]), 4) if "best_metric" in state else None,
        "best_val_epoch": state.get("best_metric_epoch"),
    }


def settings(arm: Arm) -> dict[str, Any]:
    """The main keys the arm trained with (the arm's overrides, over its plan.yaml, over the bundle), and
    what the plan itself chose (``plan``: the same unless --quick overrode it)."""
    plan_file = arm.folder / PLAN_FILE
    plan = (yaml.safe_load(plan_file.read_text()) or {}) if plan_file.is_file() else {}
    keys = {**plan, **arm.overrides}
    main_keys = ("patch_size", "spacing", "batch_size", *NETWORK_KEYS[arm.bundle])
    used = {key: workflow_setting(arm.bundle, "train", key, keys) for key in main_keys}
    values = {key: used[key] for key in main_keys[:3]}
    values["network"] = {key: used[key] for key in NETWORK_KEYS[arm.bundle]}
    values["planned"] = plan_file.is_file()
    values["plan"] = {key: plan[key] for key in main_keys if key in plan} or None
    return values


def say(message: str) -> None:
    print(f"bench-accuracy: {message}", file=sys.stderr, flush=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value)


def table(rows: list[dict], dataset: str) -> str:
    """One markdown table per dataset, a Dice column per class of its labels."""
    mine = [row for row in rows if row["dataset"] == dataset]
    if not mine:
        return ""
    classes = next((list(row["dice"]) for row in mine if row.get("dice")), [])
    titles = ["bundle", "arm", *[f"Dice {c}" for c in classes], "mean Dice", "mean IoU", "train min",
              "epochs", "patch", "batch"]  # fmt: skip
    lines = [f"{dataset}:", "| " + " | ".join(titles) + " |", "|---" * len(titles) + "|"]
    for row in mine:
        if "error" in row:
            lines.append(f"| {row['bundle']} | {row['arm']} | failed: {row['error'].splitlines()[0]} |")
            continue
        figures = [
            f"{score:.4f}"
            for score in (*[row["dice"][c] for c in classes], row["dice_mean"], row["iou_mean"])
        ]
        cells = [row["bundle"], row["arm"], *figures, row.get("train_min"), row.get("epochs"),
                 row["settings"]["patch_size"], row["settings"]["batch_size"]]  # fmt: skip
        lines.append("| " + " | ".join(fmt(cell) for cell in cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 15's done-when on the hippocampus split: planned unet3d >= 0.85, every planned bundle above
    its defaults at the same budget."""
    arms = {(r["bundle"], r["arm"]): r for r in rows if r["dataset"] == "hippocampus" and "error" not in r}
    lines = []
    for bundle in sorted({bundle for bundle, _ in arms}):
        planned, defaults = arms.get((bundle, "planned")), arms.get((bundle, "defaults"))
        if planned and defaults:
            gain = planned["dice_mean"] - defaults["dice_mean"]
            word = "improves on" if gain > 0 else "does NOT improve on"
            lines.append(f"{bundle}: planned {word} its defaults by {gain:+.4f} mean Dice")
        if bundle == "unet3d" and planned:
            met = "meets" if planned["dice_mean"] >= TARGET_DICE else "does NOT meet"
            lines.append(
                f"unet3d planned: mean Dice {planned['dice_mean']:.4f} {met} the target {TARGET_DICE}"
            )
    return lines


def report(results: dict) -> str:
    m = results["machine"]
    head = (f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, MONAI {m['monai']}; "
            f"{results['minutes']} min per training; hippocampus split seed {results['split']['seed']}: "
            f"{len(results['split']['train'])} train, {len(results['split']['test'])} held out")  # fmt: skip
    parts = [head, table(results["rows"], "hippocampus"), table(results["rows"], "mni_brain")]
    if results.get("mni_skipped"):
        parts.append(f"MNI demo data skipped: {results['mni_skipped']}")
    if not results["quick"]:  # a smoke test's figures say nothing of the targets
        parts.extend(verdicts(results["rows"]))
    return "\n\n".join(part for part in parts if part)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bundles = "default: all (quick: unet3d); none: MNI arms only"
    parser.add_argument("--bundles", nargs="*", choices=volume_bundles(), help=bundles)
    parser.add_argument("--mni-bundles", nargs="*", choices=volume_bundles(), help="default: unet3d")
    parser.add_argument("--minutes", type=float, help="training budget per arm (default 10; quick 0.2)")
    parser.add_argument("--quick", action="store_true", help="6 cases, tiny networks, 0.2 min: a smoke test")
    parser.add_argument("--fresh", action="store_true", help="redo the chosen bundles' finished arms")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="default: both")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), help="planned+LEVER arms (default none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-cases", type=int, help="held-out hippocampus cases (default 40; quick 2)")
    parser.add_argument("--train-cases", type=int, help="training cases (default: all the rest; quick 4)")
    parser.add_argument("--data", type=Path, default=HIPPOCAMPUS, help="the hippocampus dataset.json")
    parser.add_argument("--mni-data", type=Path, default=MNI)
    parser.add_argument("--work", type=Path, help=f"split, run folders, MLflow store (default {WORK})")
    parser.add_argument("--out", type=Path, help="default bench/accuracy.json (quick: accuracy_quick.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.bundles is None:  # `--bundles` with none named: only the MNI arms
        args.bundles = ["unet3d"] if quick else volume_bundles()
    args.mni_bundles = ([] if quick else ["unet3d"]) if args.mni_bundles is None else args.mni_bundles
    args.minutes = args.minutes or (0.2 if quick else 10.0)
    args.test_cases = args.test_cases or (2 if quick else 40)
    args.train_cases = args.train_cases or (4 if quick else None)
    args.work = (args.work or WORK.with_name(WORK.name + ("-quick" if quick else ""))).resolve()
    args.out = args.out or ROOT / "bench" / ("accuracy_quick.json" if quick else "accuracy.json")
    return args


def quick_overrides(bundle: str, quick: bool) -> dict[str, Any]:
    """--quick: ``make bench``'s tiny inputs and networks (with strides for the tiny widths, which the
    plan's strides need not fit); none otherwise, as the issue's command has no other argument."""
    if not quick:
        return {}
    strides = QUICK_NETWORK.get(bundle, {})
    return {**bundle_overrides(bundle, True), **strides}


def arms_to_run(args: argparse.Namespace, split_path: Path, results: dict) -> list[Arm]:
    """The hippocampus arms, then the MNI ones when its datalist is there (else a note, no failure)."""
    runs = args.work / "runs"
    chosen = [("hippocampus", split_path, bundle) for bundle in args.bundles]
    if args.mni_bundles and datalist_is_valid(args.mni_data):
        chosen += [("mni_brain", args.mni_data, bundle) for bundle in args.mni_bundles]
    elif args.mni_bundles:
        results["mni_skipped"] = (f"{args.mni_data} is absent or incomplete: prepare it with "
                                  "`python data/prepare_mni_brain.py` (needs PyPI), then rerun")  # fmt: skip
        say(results["mni_skipped"])
    else:
        results["mni_skipped"] = "no --mni-bundles" + (" (--quick)" if args.quick else "")
    arms = [(arm, {}) for arm in args.arms]
    arms += [(f"planned+{lever}", LEVERS[lever]) for lever in args.levers or ()]
    return [
        Arm(
            dataset,
            bundle,
            arm,
            datalist,
            runs / dataset / bundle / arm,
            {**quick_overrides(bundle, args.quick), **lever},
        )
        for dataset, datalist, bundle in chosen
        for arm, lever in arms
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"bench-accuracy: {args.data} not found (the shared MSD hippocampus cases)")
    args.work.mkdir(parents=True, exist_ok=True)
    split = hippocampus_split(args.data, args.seed, args.test_cases, args.train_cases)
    split_path = args.work / SPLIT_FILE
    try:
        write_split(split, split_path, args.work / "runs" / "hippocampus", args.fresh)
    except ValueError as error:
        raise SystemExit(f"bench-accuracy: {error}") from None
    results: dict[str, Any] = {
        "machine": machine.describe(512), "minutes": args.minutes, "quick": args.quick,
        "split": {"seed": args.seed, **split_names(split)}, "rows": [],
    }  # fmt: skip
    arms = arms_to_run(args, split_path, results)
    for arm in arms:
        if args.fresh:
            shutil.rmtree(arm.folder, ignore_errors=True)
        try:
            results["rows"].append(run_arm(arm, args.minutes, args.work))
        except (RuntimeError, OSError, ValueError, KeyError) as error:  # the other arms still run
            say(f"{arm.dataset} {arm.bundle} {arm.arm} failed: {error}")
            results["rows"].append(
                {"dataset": arm.dataset, "bundle": arm.bundle, "arm": arm.arm, "error": str(error)}
            )
        with atomic_write(args.out) as handle:  # a long run keeps what it measured
            handle.write((json.dumps(results, indent=2) + "\n").encode())
    print(report(results))
    if any("error" in row for row in results["rows"]):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
