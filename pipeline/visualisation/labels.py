"""Class names and modality for a picture's legend and window, from whichever file the user has."""

from __future__ import annotations

import json
from pathlib import Path


def read_label_info(path: str | Path) -> tuple[dict[int, str], str | None]:
    """Class names (and modality, if stated) from a datalist, a dataset.json or a bare {"1": "name"} map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label names file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"label names file {path} is not valid JSON: {error}") from None
    table = content.get("labels", content) if isinstance(content, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a 'labels' table or a {{index: name}} object")
    try:
        names = {int(index): str(name) for index, name in table.items()}
    except ValueError:
        raise ValueError(f"{path}: label indices must be integers, got {sorted(table)}") from None
    modalities = content.get("modality") if "labels" in content else None
    modality = str(next(iter(modalities.values()))) if isinstance(modalities, dict) and modalities else None
    return names, modality
