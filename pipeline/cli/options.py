"""What several commands share: ``key=value`` config overrides and the MLflow tracking options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

OVERRIDES_EPILOG = "Any config id can be overridden with trailing key=value arguments (learning_rate=3e-4)."


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


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The tracking options, then the trailing ``key=value`` pairs (which win on the same id)."""
    return {**tracking_overrides(args), **parse_overrides(args.overrides)}
