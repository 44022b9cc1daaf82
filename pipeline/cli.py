"""``medseg``: argument parsing only; the work is done by the functions it calls."""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.compare import JobFailed, add_compare_command
from pipeline.data.build import add_datalist_command
from pipeline.data.check import add_check_command
from pipeline.export import add_export_command
from pipeline.inference.batch import CaseFailures
from pipeline.io.atomic import DiskFullError
from pipeline.io.checkpoint import CheckpointError
from pipeline.io.dicom import add_dicom2nifti_command
from pipeline.paths import WORKFLOW_FILES, run_options
from pipeline.planning.plan import add_plan_command
from pipeline.tracking.store import TrackingUnavailable
from pipeline.training.interrupt import TrainingInterrupted
from pipeline.visualisation.commands import add_overlay_commands


def parse_value(text: str) -> Any:
    """A YAML value, except that ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs to overrides; ``::`` separates nested ids (``train::trainer::amp=false``)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"medseg: override {pair!r} is not key=value")
        overrides[key] = parse_value(value)
    return overrides


def _train(args: argparse.Namespace) -> None:
    from pipeline.workflows import train

    overrides = {**tracking_overrides(args), **parse_overrides(args.overrides)}
    models = train(
        args.bundle,
        args.data,
        args.output,
        args.epochs,
        overrides,
        nproc=args.nproc,
        check_data=not args.skip_check,
        plan=not args.no_plan,
        minutes=args.minutes,
    )
    print(f"checkpoints: {models}")


def default_checkpoint(bundle: str) -> Path:
    return Path("outputs") / bundle / "models" / "model.pt"


def ensemble_members(text: str) -> list[tuple[str, Path]]:
    """``bundle[=checkpoint],...`` (a bare name means that bundle's default checkpoint)."""
    members = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, checkpoint = item.partition("=")
        members.append((name, Path(checkpoint) if checkpoint else default_checkpoint(name)))
    return members


def _infer(args: argparse.Namespace) -> None:
    from pipeline.workflows import infer, infer_ensemble

    checkpoint = args.checkpoint or default_checkpoint(args.bundle)
    overrides = {**tracking_overrides(args), **parse_overrides(args.overrides)}
    if args.dicom_seg:
        overrides["dicom_seg"] = True
    if args.ensemble:
        members = [(args.bundle, Path(checkpoint)), *ensemble_members(args.ensemble)]
        names, checkpoints = [name for name, _ in members], [path for _, path in members]
        out = infer_ensemble(names, checkpoints, args.input, args.output, overrides, overwrite=args.overwrite)
    else:
        out = infer(args.bundle, args.input, args.output, checkpoint, overrides, overwrite=args.overwrite)
    print(f"segmentations: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluation import REPORT_FILE, read_summary
    from pipeline.evaluation.report import summary_lines

    if args.bundle and "=" in args.bundle:  # no bundle given: argparse took the first key=value for it
        args.overrides, args.bundle = [args.bundle, *args.overrides], None
    out = _score_predictions(args) if args.predictions else _run_evaluation(args)
    print("\n".join(summary_lines(read_summary(out))))
    print(f"report: {Path(out) / REPORT_FILE}")


def _run_evaluation(args: argparse.Namespace) -> Path:
    from pipeline.workflows import evaluate

    if not args.bundle:
        raise ValueError("give a bundle to run, or --predictions DIR to score segmentations already on disk")
    checkpoint = args.checkpoint or default_checkpoint(args.bundle)
    output = args.output or Path("outputs") / args.bundle / f"evaluation_{args.split}"
    overrides = {**tracking_overrides(args), **parse_overrides(args.overrides)}
    return evaluate(args.bundle, args.data, output, checkpoint, args.split, overrides)


def _score_predictions(args: argparse.Namespace) -> Path:
    from pipeline.evaluation import evaluate_predictions

    if args.bundle or args.checkpoint:
        raise ValueError("--predictions scores files on disk: give no bundle and no --checkpoint with it")
    options = parse_overrides(args.overrides)
    unknown = sorted(set(options) - {"val_fold", "dataset_dir"})
    if unknown:
        raise ValueError(
            f"with --predictions only val_fold= and dataset_dir= apply, not {', '.join(unknown)}"
        )
    output = args.output or Path(args.predictions).parent / f"evaluation_{args.split}"
    return evaluate_predictions(args.predictions, args.data, output, args.split, **options)


def _download(args: argparse.Namespace) -> None:
    from pipeline.data.download import download_msd

    print(download_msd(args.name, Path(args.root)))


def _bundles(_: argparse.Namespace) -> None:
    from pipeline.workflows import available_bundles, describe

    print(f"{'bundle':<16} {'version':<9} {'parameters':>12}")
    for name in available_bundles():
        info = describe(name)
        print(f"{name:<16} {info['version']:<9} {info['parameters']:>12,}")


def _config_files(args: argparse.Namespace) -> None:
    """One option per line, each value one shell word: ``python -m monai.bundle run $(medseg config-files
    unet3d train) --datalist ...`` runs what ``medseg train`` runs, from wherever the package is."""
    options = run_options(args.bundle, args.workflow, args.tracking)
    print("\n".join(f"--{key} {value}" for key, value in options.items()))


def _demo(args: argparse.Namespace) -> None:
    from pipeline.demo import run_demo

    run_demo(Path(args.output), epochs=args.epochs)


def add_tracking_options(command: argparse.ArgumentParser) -> None:
    """Where the run is recorded; each flag is a config override, so the bundles stay the one source."""
    group = command.add_argument_group("tracking (MLflow)")
    group.add_argument(
        "--tracking-uri", help="tracking server or store (default: MLFLOW_TRACKING_URI, else ./mlflow)"
    )
    group.add_argument("--experiment", help="experiment name (default: the dataset's name)")
    group.add_argument(
        "--run-name", help="run name (default: unique per run; a resumed training keeps its own)"
    )
    group.add_argument(
        "--tracking-optional", action="store_true", help="go on untracked if the server is down"
    )


def tracking_overrides(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {
        "tracking_uri": args.tracking_uri,
        "experiment_name": args.experiment,
        "run_name": args.run_name,
    }
    overrides: dict[str, Any] = {key: value for key, value in chosen.items() if value}
    if args.tracking_optional:
        overrides["tracking_required"] = False
    return overrides


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a bundle on a datalist (rerun to resume)")
    train.add_argument("bundle")
    train.add_argument("--data", required=True, help="MSD-style datalist JSON")
    train.add_argument("--epochs", type=int)
    train.add_argument("--output", default=None, help="run folder (default outputs/<bundle>)")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun; Gloo on CPU")
    train.add_argument("--skip-check", action="store_true", help="do not check every case before training")
    train.add_argument(
        "--minutes", type=float, help="wall-clock training budget: the plan fits it (time_budget_minutes)"
    )
    train.add_argument(
        "--no-plan", action="store_true", help="train on the bundle's defaults, with no plan from the data"
    )
    train.set_defaults(func=_train)

    infer = commands.add_parser("infer", help="segment NIfTI files or folders")
    infer.add_argument("bundle")
    infer.add_argument("--input", nargs="+", required=True)
    infer.add_argument("--output", required=True)
    infer.add_argument("--checkpoint", help="default outputs/<bundle>/models/model.pt")
    infer.add_argument(
        "--dicom-seg", action="store_true", help="also write a DICOM SEG for DICOM series inputs"
    )
    infer.add_argument(
        "--overwrite", action="store_true", help="segment again the cases whose output exists (skipped)"
    )
    infer.add_argument(
        "--ensemble",
        metavar="BUNDLE[=CHECKPOINT],...",
        help="average the softmax of these checkpoints with the first bundle's (bundles or folds)",
    )
    infer.set_defaults(func=_infer)

    evaluate = commands.add_parser(
        "evaluate", help="Dice, IoU, HD95, ASD and volumes per case and class, with an HTML report"
    )
    evaluate.add_argument("bundle", nargs="?", help="run this bundle's network (omit with --predictions)")
    evaluate.add_argument("--data", required=True, help="MSD-style datalist with the labels")
    evaluate.add_argument("--split", default="validation", choices=["validation", "test", "train", "all"])
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument(
        "--predictions", help="score <case>_seg.nii.gz files in this folder instead (no network, untracked)"
    )
    evaluate.add_argument(
        "--output", help="default outputs/<bundle>/evaluation_<split>, or beside --predictions"
    )
    evaluate.set_defaults(func=_evaluate)
    for command in (train, infer, evaluate):
        add_tracking_options(command)
        command.epilog = (
            "Any config id can be overridden with trailing key=value arguments (learning_rate=3e-4)."
        )
        command.set_defaults(takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(commands)
    add_datalist_command(commands)
    add_check_command(commands)
    add_dicom2nifti_command(commands)
    add_export_command(commands)
    add_compare_command(commands)
    add_plan_command(commands)

    add_overlay_commands(commands)

    download = commands.add_parser("download", help="fetch a standard dataset (e.g. msd-spleen)")
    download.add_argument("name")
    download.add_argument("--root", default="data/msd")
    download.set_defaults(func=_download)

    listing = commands.add_parser("bundles", help="list the bundles with their parameter counts")
    listing.set_defaults(func=_bundles)

    files = commands.add_parser(
        "config-files", help="print the options of `python -m monai.bundle run` for a bundle's workflow"
    )
    files.add_argument("bundle", metavar="NAME")
    files.add_argument("workflow", choices=list(WORKFLOW_FILES))
    files.add_argument("--no-tracking", dest="tracking", action="store_false", help="omit --tracking")
    files.set_defaults(func=_config_files)

    demo = commands.add_parser("demo", help="prepare the sample data, train, infer, evaluate, track")
    demo.add_argument("--output", default="outputs/demo")
    demo.add_argument("--epochs", type=int, default=None)
    demo.set_defaults(func=_demo)
    return parser


# Warnings that say nothing to a medseg user: the bundles run here are this project's own, and
# the optional GPU DICOM decoder is not expected on most machines.
QUIET_WARNINGS = (r".*is from a source you trust.*", r".*nvImageCodec.*")


def main(argv: Sequence[str] | None = None) -> int:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if getattr(args, "command", None) == "train" and args.output is None:
        args.output = str(Path("outputs") / args.bundle)
    try:
        status = args.func(args)
    except TrainingInterrupted as stopped:  # a checkpoint was written: 130 (SIGINT) / 143 (SIGTERM)
        print(f"medseg: training {stopped}", file=sys.stderr)
        return stopped.interruption.exit_status
    except CaseFailures as error:  # the other cases were segmented
        print(f"medseg: error: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, TrackingUnavailable) as error:
        print(f"medseg: error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"medseg: error: {error}; the previous file, if any, is intact", file=sys.stderr)
        return 2
    except JobFailed as error:  # a step of `medseg compare` outside the per-bundle handling
        print(f"medseg: error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:  # torchrun, the only other child process medseg waits on
        print(f"medseg: error: the distributed run exited with {error.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
