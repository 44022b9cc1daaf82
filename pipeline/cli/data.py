"""``medseg datalist``, ``check``, ``dicom2nifti``, ``plan`` and ``download``: preparing a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.data.build import build_datalist
from pipeline.data.check import DEFAULT_ROLES, MEMORY_BUDGET, checked_cases
from pipeline.data.datalist import ROLES
from pipeline.data.download import download_msd
from pipeline.data.layouts import READERS, listing
from pipeline.io.dicom import ConversionFailures, dicom_to_nifti
from pipeline.paths import available_bundles
from pipeline.planning.plan import plan_datalist, summary

BUILD_OPTIONS = ("layout", "folds", "val_fraction", "seed", "labels", "modality", "image_dir", "label_dir")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _datalist(args: argparse.Namespace) -> None:
    root = Path(args.root)
    out = Path(args.output) if args.output else (root.parent if root.is_file() else root) / "datalist.json"
    path = build_datalist(root, out, **{key: getattr(args, key) for key in BUILD_OPTIONS})
    content = json.loads(path.read_text())
    labels, modalities = list(content["labels"].values()), ", ".join(content["modality"].values())
    print(
        f"{path}: {content['numTraining']} labelled cases, {content['numTest']} test, "
        f"{len(labels)} labels ({listing(labels, 6)}), modality {modalities}"
    )


def add_datalist_command(commands: argparse._SubParsersAction) -> None:
    """``medseg datalist DIR [-o datalist.json] [--folds K | --val-fraction F] [--seed S] ...``."""
    parser = commands.add_parser("datalist", help="write the datalist of a dataset (MSD, nnU-Net, ...)")
    parser.add_argument("root", metavar="DIR", help="dataset folder, or a CSV file of image,label rows")
    parser.add_argument("-o", "--output", help="datalist to write (default: datalist.json in DIR)")
    parser.add_argument("--layout", choices=list(READERS), help="skip detection and read this layout")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--val-fraction", type=float, help="an explicit validation list instead of folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case shuffle (default 0)")
    parser.add_argument("--labels", type=_names, help="names by index, comma-separated: background,liver")
    parser.add_argument("--modality", help="CT, MRI, ...: one for all channels, or one per channel")
    parser.add_argument("--image-dir", default="images", help="image folder of the folders/dicom layouts")
    parser.add_argument("--label-dir", default="labels", help="label folder of the folders/dicom layouts")
    parser.set_defaults(func=_datalist)


def _check(args: argparse.Namespace) -> int:
    """Print every finding and a summary line; exit status 1 when any error was found."""
    budget = int(args.memory_gib * 2**30)
    count, findings = checked_cases(
        args.datalist, args.dataset_dir, args.roles, val_fold=args.val_fold, memory_budget=budget
    )
    for finding in findings:
        print(f"{finding.severity}: {finding}")
    errors = sum(f.severity == "error" for f in findings)
    print(f"{count} cases checked: {errors} errors, {len(findings) - errors} warnings")
    return 1 if errors else 0


def add_check_command(commands: argparse._SubParsersAction) -> None:
    """``medseg check DATALIST``: the report, and exit status 1 when any error was found."""
    check = commands.add_parser("check", help="report every problem of a datalist's files in one pass")
    check.add_argument("datalist", metavar="DATALIST")
    check.add_argument("--dataset-dir", help="folder the datalist's paths are relative to")
    check.add_argument("--roles", nargs="+", default=list(DEFAULT_ROLES), choices=ROLES)
    check.add_argument("--val-fold", type=int, default=0)
    check.add_argument("--memory-gib", type=float, default=MEMORY_BUDGET / 2**30, help="size guard (GiB)")
    check.set_defaults(func=_check)


def _dicom2nifti(args: argparse.Namespace) -> int:
    """Prints what was written, also when some series failed; then the failures, and exit status 1."""
    try:
        written, failures = dicom_to_nifti(args.src, args.out, args.overwrite), None
    except ConversionFailures as error:
        written, failures = error.written, error
    for path in written:
        print(path)
    if failures:
        print(f"medseg: error: {failures}", file=sys.stderr)
    return 1 if failures else 0


def add_dicom2nifti_command(commands: argparse._SubParsersAction) -> None:
    """``medseg dicom2nifti SRC OUT``: prints the NIfTI files written, one a line."""
    command = commands.add_parser("dicom2nifti", help="convert DICOM series to NIfTI with JSON sidecars")
    command.add_argument("src", metavar="SRC", help="a series folder, FOLDER#SeriesInstanceUID, or a tree")
    command.add_argument("out", metavar="OUT", help="output folder")
    command.add_argument(
        "--overwrite", action="store_true", help="replace outputs that exist (default: keep)"
    )
    command.set_defaults(func=_dicom2nifti)


def _plan(args: argparse.Namespace) -> int:
    plan, path = plan_datalist(args.datalist, args.bundle, args.minutes, args.output, args.dataset_dir)
    print(summary(plan))
    print(f"wrote {path}")
    return 0


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    """``medseg plan DATALIST [--bundle B] [--minutes M] [-o plan.yaml]``."""
    command = commands.add_parser("plan", help="fingerprint a datalist and write its plan.yaml")
    command.add_argument("datalist", metavar="DATALIST")
    command.add_argument("--bundle", default="unet3d", choices=available_bundles())
    command.add_argument("--minutes", type=float, default=None, help="training time budget")
    command.add_argument(
        "-o", "--output", default=None, help="plan file (default: plan.yaml beside DATALIST)"
    )
    command.add_argument("--dataset-dir", default=None, help="folder the datalist's paths are relative to")
    command.set_defaults(func=_plan)


def _download(args: argparse.Namespace) -> None:
    print(download_msd(args.name, Path(args.root)))


def add_download_command(commands: argparse._SubParsersAction) -> None:
    download = commands.add_parser("download", help="fetch a standard dataset (e.g. msd-spleen)")
    download.add_argument("name")
    download.add_argument("--root", default="data/msd")
    download.set_defaults(func=_download)
