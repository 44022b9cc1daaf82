"""``medseg overlay`` and ``medseg montage``: argument parsing over ``save_overlay`` and ``save_montage``."""

from __future__ import annotations

import argparse

from pipeline.visualisation.labels import read_label_info
from pipeline.visualisation.montage import datalist_montage_cases, parse_case, save_montage
from pipeline.visualisation.overlay import save_overlay
from pipeline.visualisation.volumes import dicom_modality


def _modality(args: argparse.Namespace, stated: str | None, image: str) -> str:
    return args.modality or stated or dicom_modality(image) or "MRI"


def _given(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """Options given on the command line; the others keep the Python function's defaults (one source)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _overlay(args: argparse.Namespace) -> None:
    names, stated = read_label_info(args.labels) if args.labels else ({}, None)
    out = save_overlay(
        args.image,
        args.seg,
        args.output,
        label=args.label,
        label_names=names,
        title=args.title,
        modality=_modality(args, stated, args.image),
        slice_at=args.slice,
        **_given(args, "dpi", "max_rows"),
    )
    print(out)


def _montage(args: argparse.Namespace) -> None:
    if bool(args.cases) == bool(args.data):
        raise ValueError(
            "give either IMAGE:SEG[:LABEL] cases or --data with --predictions, not both or neither"
        )
    if args.data:
        if not args.predictions:
            raise ValueError("--data needs --predictions (the folder `medseg infer` wrote)")
        cases = datalist_montage_cases(args.data, args.predictions, args.split)
    else:
        cases = [parse_case(text) for text in args.cases]
    info = args.labels or args.data
    names, stated = read_label_info(info) if info else ({}, None)
    out = save_montage(
        cases,
        args.output,
        label_names=names,
        modality=_modality(args, stated, str(cases[0].image)),
        columns=args.columns,
        title=args.title or "",
        **_given(args, "dpi"),
    )
    print(out)


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--labels", help='class names: a datalist, dataset.json or {"1": "name"} JSON')
    command.add_argument(
        "--modality",
        help="CT: fixed soft-tissue window; others: percentiles (default: "
        "from --labels/--data, a DICOM series' header, else MRI)",
    )
    command.add_argument("--title")
    command.add_argument("--dpi", type=int, default=argparse.SUPPRESS, help="pixels per inch (default 100)")
    command.add_argument("-o", "--output", required=True, help="PNG to write")


def add_overlay_commands(commands: argparse._SubParsersAction) -> None:
    overlay = commands.add_parser(
        "overlay", help="colour overlay PNG of a segmentation (a row per structure)"
    )
    overlay.add_argument("image", help="NIfTI file or DICOM series folder")
    overlay.add_argument("seg", help="segmentation on the image's grid")
    overlay.add_argument("--label", help="ground truth, shown beside the prediction with the Dice")
    overlay.add_argument(
        "--slice",
        nargs=3,
        type=int,
        metavar=("I", "J", "K"),
        help="one row through this voxel (the image file's own indices, as viewers show them) "
        "instead of one row through the centre of each structure",
    )
    overlay.add_argument(
        "--max-rows", type=int, default=argparse.SUPPRESS, help="at most this many rows (default 6)"
    )
    _common(overlay)
    overlay.set_defaults(func=_overlay)

    montage = commands.add_parser("montage", help="one PNG with a tile per case (axial slice, name, Dice)")
    montage.add_argument(
        "cases", nargs="*", metavar="IMAGE:SEG[:LABEL]", help="explicit cases, or use --data"
    )
    montage.add_argument("--data", help="datalist: its --split cases, labels, names and modality")
    montage.add_argument("--predictions", help="folder of <case>_seg.nii.gz from `medseg infer`")
    montage.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    montage.add_argument("--columns", type=int, help="tiles per row (default: about square)")
    _common(montage)
    montage.set_defaults(func=_montage)
