"""A bundle's workflow as a ``ConfigParser`` in this process, composed as ``medseg`` runs it.

Checking a checkpoint, building ensemble members, describing a bundle, probing a network's memory
and the benchmark all need the bundle's config in Python rather than through ``monai.bundle run``;
this is the one place that composes it (``pipeline.paths`` says which files, in which order), so the
pieces cannot drift apart in the metadata they read or in which keys win.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from pipeline.io.checkpoint import with_training_config
from pipeline.paths import bundle_dir, config_files, meta_files


def bundle_parser(
    bundle: str,
    workflow: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    checkpoint: str | Path | None = None,
    meta: bool = True,
) -> ConfigParser:
    """The bundle's ``workflow`` config, its metadata under ``_meta_`` unless ``meta`` is False.

    Keys go in as a run's command line would set them, lowest first: ``bundle_root`` (the bundle's
    folder), then, with a ``checkpoint``, the config keys it was trained with (network and
    preprocessing, so the weights fit), then ``overrides``, then ``checkpoint`` itself (absolute).
    """
    parser = ConfigParser()
    if meta:
        parser.read_meta(meta_files(bundle))
    parser.read_config(config_files(bundle, workflow))
    keys = dict(overrides or {})
    if checkpoint is not None:
        keys = {**with_training_config(checkpoint, keys), "checkpoint": str(Path(checkpoint).resolve())}
    parser.update({"bundle_root": str(bundle_dir(bundle)), **keys})
    return parser
