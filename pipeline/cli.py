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

from pipeline.data.build import add_datalist_command
from pipeline.data.check import add_check_command
from pipeline.export import add_export_command
from pipeline.io.checkpoint import CheckpointError
from pipeline.io.dicom import add_dicom2nifti_command
from pipeline.tracking.store import TrackingUnavailable


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
    )
    print(f"checkpoints: {models}")


def _infer(args: argparse.Namespace) -> None:
    from pipeline.workflows import infer

    checkpoint = args.checkpoint or Path("outputs") / args.bundle / "models" / "model.pt"
    overrides = {**tracking_overrides(args), **parse_overrides(args.overrides)}
    if args.dicom_seg:
        overrides["dicom_seg"] = True
    out = infer(args.bundle, args.input, args.output, checkpoint, overrides)
    print(f"segmentations: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluation import read_metric_means
    from pipeline.workflows import evaluate

    checkpoint = args.checkpoint or Path("outputs") / args.bundle / "models" / "model.pt"
    output = args.output or Path("outputs") / args.bundle / f"evaluation_{args.split}"
    overrides = {**tracking_overrides(args), **parse_overrides(args.overrides)}
    out = evaluate(args.bundle, args.data, output, checkpoint, args.split, overrides)
    for name, value in read_metric_means(out).items():
        print(f"{name}: {value:.4f}")
    print(f"per-case metrics: {out}")


def _overlay(args: argparse.Namespace) -> None:
    from pipeline.visualisation import save_overlay

    print(save_overlay(args.image, args.seg, args.output, label=args.label, modality=args.modality))


def _download(args: argparse.Namespace) -> None:
    from pipeline.data.download import download_msd

    print(download_msd(args.name, Path(args.root)))


def _bundles(_: argparse.Namespace) -> None:
    from pipeline.workflows import available_bundles, describe

    print(f"{'bundle':<16} {'version':<9} {'parameters':>12}")
    for name in available_bundles():
        info = describe(name)
        print(f"{name:<16} {info['version']:<9} {info['parameters']:>12,}")


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
    train.set_defaults(func=_train)

    infer = commands.add_parser("infer", help="segment NIfTI files or folders")
    infer.add_argument("bundle")
    infer.add_argument("--input", nargs="+", required=True)
    infer.add_argument("--output", required=True)
    infer.add_argument("--checkpoint", help="default outputs/<bundle>/models/model.pt")
    infer.add_argument(
        "--dicom-seg", action="store_true", help="also write a DICOM SEG for DICOM series inputs"
    )
    infer.set_defaults(func=_infer)

    evaluate = commands.add_parser("evaluate", help="Dice and IoU per case and class on a datalist split")
    evaluate.add_argument("bundle")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="validation", choices=["validation", "test", "train", "all"])
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument("--output")
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

    overlay = commands.add_parser("overlay", help="colour overlay PNG of a segmentation")
    overlay.add_argument("image")
    overlay.add_argument("seg")
    overlay.add_argument("--label", help="ground truth, shown beside the prediction with the Dice")
    overlay.add_argument("--modality", default="MRI")
    overlay.add_argument("-o", "--output", required=True)
    overlay.set_defaults(func=_overlay)

    download = commands.add_parser("download", help="fetch a standard dataset (e.g. msd-spleen)")
    download.add_argument("name")
    download.add_argument("--root", default="data/msd")
    download.set_defaults(func=_download)

    listing = commands.add_parser("bundles", help="list the bundles with their parameter counts")
    listing.set_defaults(func=_bundles)

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
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, TrackingUnavailable) as error:
        print(f"medseg: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"medseg: error: the distributed run exited with {error.returncode}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
