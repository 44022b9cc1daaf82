"""What may leave the machine for MLflow, and in what form: metric names MLflow accepts, filter
values it parses, case names without paths or DICOM UIDs, and configs without paths or credentials."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit

from pipeline.io.dicom import split_series_path
from pipeline.io.readers import base_name

REDACTED = "<redacted>"
_UNSAFE_METRIC = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow accepts in a metric name
_UID = re.compile(r"^\d+(\.\d+)+$")  # a DICOM UID: digits and dots
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_QUOTED_PATH = re.compile(r"""(['"])(/[^/'"]+/[^'"]*)\1""")  # '/a/b' in an expression, not '/file.csv'


def metric_name(text: str) -> str:
    """``text`` as a metric name MLflow accepts: any other character becomes ``_`` (``kidney (left)``
    would otherwise be refused, and with it the whole batch of the epoch's metrics)."""
    return _UNSAFE_METRIC.sub("_", text)


def filter_value(value: str) -> str:
    """``value`` quoted for an MLflow search filter. MLflow's filter syntax has no escapes, so the
    quote is one the value does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} holds both ' and \", which an MLflow search filter cannot express")


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def case_label(source: str | PurePath) -> str:
    """The name a case is shown under outside the machine: its outputs' ``base_name`` (the file name
    without its image extension; a ``folder#uid`` series, the folder and a hash of the UID), never a
    folder path; a series folder named by its UID gets a hash of it too."""
    folder, uid = split_series_path(source)
    if uid:  # named so even where the folder is absent here, which base_name cannot tell
        return f"{case_label(folder.name)}_{short_hash(uid)}"
    name = base_name(source)
    return f"series_{short_hash(name)}" if _UID.match(name) else name


def redact_config(config: Any, dataset_dir: str | Path | None = None) -> Any:
    """A copy of a (parsed or raw) config that may go to MLflow: absolute paths under ``dataset_dir``
    become relative to it, other absolute paths ``<redacted>``, a URI keeps its scheme and host only
    (no credentials, no path); those paths, and quoted absolute paths, inside expressions too."""
    root = os.path.abspath(dataset_dir) if dataset_dir else None
    found = sorted(set(_absolute_values(config)), key=len, reverse=True)  # longest first

    def clean(text: str) -> str:
        if _URI.match(text):
            return public_uri(text)
        if os.path.isabs(text):
            return _public_path(text, root)
        for path in found:
            text = text.replace(path, _public_path(path, root))
        text = text.replace(root, ".") if root else text
        return _QUOTED_PATH.sub(lambda m: m[1] + _public_path(m[2], root) + m[1], text)

    return _map_strings(config, clean)


def dataset_root(config: Any) -> str | None:
    """The folder a config's data paths are relative to: ``dataset_dir``, else the datalist's folder."""
    if not isinstance(config, dict):
        return None
    for key, folder in (("dataset_dir", False), ("datalist", True)):
        value = config.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.dirname(value) if folder else value
    return None


def _public_path(path: str, root: str | None) -> str:
    absolute = os.path.abspath(path)
    if root and (absolute == root or absolute.startswith(root + os.sep)):
        return os.path.relpath(absolute, root)
    return REDACTED


def public_uri(uri: str) -> str:
    """A tracking URI as it may be printed or recorded: scheme and host, no credentials, no path."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host or REDACTED}"


def _absolute_values(config: Any) -> Iterable[str]:
    if isinstance(config, str):
        if os.path.isabs(config):
            yield config
    elif isinstance(config, dict):
        for value in config.values():
            yield from _absolute_values(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _absolute_values(value)


def _map_strings(config: Any, clean: Any) -> Any:
    if isinstance(config, str):
        return clean(config)
    if isinstance(config, dict):
        return {key: _map_strings(value, clean) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_map_strings(value, clean) for value in config]
    return config
