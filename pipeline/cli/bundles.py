"""``medseg bundles``, ``config-files``, ``export-bundle`` and ``demo``: the bundles themselves."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.demo import run_demo
from pipeline.export import export_bundle, export_onnx
from pipeline.paths import WORKFLOW_FILES, run_options
from pipeline.workflows import available_bundles, describe


def _bundles(_: argparse.Namespace) -> None:
    print(f"{'bundle':<16} {'version':<9} {'parameters':>12}")
    for name in available_bundles():
        info = describe(name)
        print(f"{name:<16} {info['version']:<9} {info['parameters']:>12,}")


def add_bundles_command(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser("bundles", help="list the bundles with their parameter counts")
    listing.set_defaults(func=_bundles)


def _config_files(args: argparse.Namespace) -> None:
    """One option per line, each value one shell word: ``python -m monai.bundle run $(medseg config-files
    unet3d train) --datalist ...`` runs what ``medseg train`` runs, from wherever the package is."""
    options = run_options(args.bundle, args.workflow, args.tracking)
    print("\n".join(f"--{key} {value}" for key, value in options.items()))


def add_config_files_command(commands: argparse._SubParsersAction) -> None:
    files = commands.add_parser(
        "config-files", help="print the options of `python -m monai.bundle run` for a bundle's workflow"
    )
    files.add_argument("bundle", metavar="NAME")
    files.add_argument("workflow", choices=list(WORKFLOW_FILES))
    files.add_argument("--no-tracking", dest="tracking", action="store_false", help="omit --tracking")
    files.set_defaults(func=_config_files)


def _export(args: argparse.Namespace) -> None:
    print(export_bundle(args.bundle, args.out_dir, args.checkpoint))


def add_export_command(commands: argparse._SubParsersAction) -> None:
    """``medseg export-bundle NAME OUT_DIR [--checkpoint FILE]``."""
    export = commands.add_parser("export-bundle", help="write a self-contained model-zoo bundle folder")
    export.add_argument("bundle", metavar="NAME")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--checkpoint", metavar="FILE", help="weights to ship as models/model.pt")
    export.set_defaults(func=_export)


def _export_onnx(args: argparse.Namespace) -> None:
    print(export_onnx(args.bundle, args.checkpoint, args.out))


def add_export_onnx_command(commands: argparse._SubParsersAction) -> None:
    """``medseg export-onnx NAME CHECKPOINT OUT``."""
    export = commands.add_parser(
        "export-onnx", help="write the trained network as ONNX, its input and output in the file's metadata"
    )
    export.add_argument("bundle", metavar="NAME")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("out", metavar="OUT", help="the .onnx file to write (not an existing one)")
    export.set_defaults(func=_export_onnx)


def _demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.output), epochs=args.epochs)


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="prepare the sample data, train, infer, evaluate, track")
    demo.add_argument("--output", default="outputs/demo")
    demo.add_argument("--epochs", type=int, default=None)
    demo.set_defaults(func=_demo)
