"""Reading a datalist or dataset-facts JSON file, naming the file in every error.

Here, below ``pipeline.data``, because checkpoints read the facts saved beside older weights too; what a
datalist means (cases, folds, labels) is ``pipeline.data.datalist``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATASET_INFO_FILE = "dataset.json"  # the dataset facts beside a training's checkpoints
Source = str | Path | Mapping[str, Any]  # a datalist or dataset.json path, or dataset facts


def read_json(path: Source) -> dict:
    """Load a datalist (or dataset info) file, naming the file in every error; dataset facts (a dict,
    as a checkpoint holds them) are checked the same way and returned as they are."""
    if isinstance(path, Mapping):
        if "labels" not in path:
            raise ValueError("dataset facts have no 'labels' table (index -> name)")
        return dict(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict):
        raise ValueError(f"datalist {path} has no 'labels' table (index -> name), as MSD datalists do")
    if not isinstance(content.get("modality", {}), dict):
        raise ValueError(f"datalist {path}: 'modality' is not a table (channel -> name)")
    return content
