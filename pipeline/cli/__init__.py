"""``medseg``: argument parsing only; the work is done by the functions it calls."""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from collections.abc import Sequence

from pipeline.cli import bundles, data, runs, visualisation
from pipeline.cli.options import parse_overrides
from pipeline.compare import JobFailed
from pipeline.inference.batch import CaseFailures
from pipeline.io.atomic import DiskFullError
from pipeline.io.checkpoint import CheckpointError
from pipeline.tracking.store import TrackingUnavailable
from pipeline.training.interrupt import TrainingInterrupted

__all__ = ["build_parser", "main", "parse_overrides"]

# In the order `medseg --help` lists them.
COMMANDS = (
    runs.add_train_command,
    runs.add_infer_command,
    runs.add_evaluate_command,
    data.add_datalist_command,
    data.add_check_command,
    data.add_dicom2nifti_command,
    bundles.add_export_command,
    bundles.add_export_onnx_command,
    runs.add_compare_command,
    data.add_plan_command,
    visualisation.add_overlay_commands,
    data.add_download_command,
    bundles.add_bundles_command,
    bundles.add_config_files_command,
    bundles.add_demo_command,
)

# Warnings that say nothing to a medseg user: the bundles run here are this project's own, and
# the optional GPU DICOM decoder is not expected on most machines.
QUIET_WARNINGS = (r".*is from a source you trust.*", r".*nvImageCodec.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
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
