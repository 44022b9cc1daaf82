"""Reading Medical Segmentation Decathlon style datalists, the one input format every bundle takes.

A datalist is a JSON file with a ``labels`` table (index -> name), a ``modality`` table
(channel -> name), a ``training`` list of ``{"image", "label"[, "fold"]}`` entries and an
optional ``test`` list. Paths are relative to the datalist's folder (or to ``dataset_dir``),
so a dataset folder can be moved as a whole.

Training keeps the datalist's header (everything but the case lists) and a fingerprint of its
training cases inside its checkpoints and beside them as ``dataset.json``: inference then knows the
label names, channel count and modality of the model without the training data being present, and a
resumed training can tell that it is given the same dataset. The functions reading facts take a
datalist path or such a dict of facts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from pipeline.io.atomic import atomic_write
from pipeline.io.datalist_file import DATASET_INFO_FILE, Source, read_json
from pipeline.io.dicom import is_series_path
from pipeline.io.names import is_planar

CASE_LISTS = ("training", "validation", "test")
FINGERPRINT_KEY = "training_cases"  # in the dataset facts: count and hash of the labelled cases
ROLES = ("train", "validation", "test", "all")
MASK_WHITE = 255  # microscopy's binary masks: 0 and 255 (white), not class indices 0 and 1


def label_names(path: Source) -> dict[int, str]:
    """Class index -> name, background included, ordered by index."""
    labels = read_json(path)["labels"]
    names = {int(index): str(name) for index, name in labels.items()}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"datalist {_name(path)}: label indices {sorted(names)} are not 0..{len(names) - 1}")
    return names


def label_values(path: Source) -> dict[int, int] | None:
    """The header's ``label_values`` (pixel value -> class index, ``{"255": 1}``) or None: labels
    whose pixel values are not their class indices (``pipeline.transforms.LabelValuesd``)."""
    table = read_json(path).get("label_values")
    if table is None:
        return None
    classes = len(label_names(path))
    mapping = {int(value): int(index) for value, index in table.items()}
    wrong = sorted(index for index in mapping.values() if not 0 <= index < classes)
    if wrong:
        raise ValueError(f"datalist {_name(path)}: label_values map to {wrong}, not classes 0..{classes - 1}")
    return mapping


def pixel_classes(labels: Mapping[int, str], mapping: Mapping[int, int] | None) -> dict[int, str]:
    """Label pixel value -> class name, as ``pipeline.transforms.LabelValuesd`` reads labels: through
    ``label_values`` when given; else each class's own index, and 255 for the foreground of a
    two-class dataset (a 0/255 mask)."""
    if mapping:
        return {int(value): labels[int(index)] for value, index in mapping.items()}
    return {**labels, MASK_WHITE: labels[1]} if len(labels) == 2 else dict(labels)


def num_classes(path: Source) -> int:
    return len(label_names(path))


def modality(path: Source) -> str:
    """The modality of the first channel ('CT', 'MRI', ...): it selects the intensity normalisation."""
    modalities = read_json(path).get("modality", {"0": "MRI"})
    return str(modalities.get("0", next(iter(modalities.values()))))


def num_channels(path: Source) -> int:
    return len(read_json(path).get("modality", {"0": "MRI"}))


def dataset_name(path: Source) -> str:
    """A name for the MLflow experiment, so runs of all bundles on one dataset sit side by side."""
    fallback = "dataset" if isinstance(path, Mapping) else Path(path).parent.name
    return str(read_json(path).get("name") or fallback)


def _name(source: Source) -> str:
    return "of the checkpoint" if isinstance(source, Mapping) else str(source)


def cases(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    role: str = "train",
    val_fold: int = 0,
    num_folds: int = 5,
) -> list[dict]:
    """The cases for one role, with absolute paths.

    ``train`` and ``validation`` come from the ``training`` list split by the ``fold`` field
    (``validation`` = fold ``val_fold``), unless the datalist has an explicit ``validation``
    list. Entries without a fold are assigned ``index % num_folds``, which is deterministic.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    content = read_json(datalist)
    base_dir = str(dataset_dir) if dataset_dir else str(Path(datalist).resolve().parent)

    def load(key: str) -> list[dict]:
        if not content.get(key):
            return []
        _check_entries(datalist, key, content[key])
        return load_decathlon_datalist(
            str(datalist), is_segmentation=True, data_list_key=key, base_dir=base_dir
        )

    if role == "test":
        return load("test")
    training = load("training")
    if role == "all":
        return training + load("validation")
    if content.get("validation"):
        return training if role == "train" else load("validation")
    for index, case in enumerate(training):
        case.setdefault("fold", index % num_folds)
    in_val = [case for case in training if int(case["fold"]) == val_fold]
    if role == "validation":
        return in_val
    return [case for case in training if int(case["fold"]) != val_fold]


def _check_entries(datalist: str | Path, key: str, entries: object) -> None:
    """A case list's types: a number for a path or a word for a fold would otherwise fail later as a
    TypeError deep in MONAI or in the naming of outputs, naming neither the datalist nor the case."""
    if not isinstance(entries, list):
        raise ValueError(f"datalist {datalist}: '{key}' is a {type(entries).__name__}, not a list of cases")
    for index, case in enumerate(entries):
        where = f"datalist {datalist}: {key} case {index}"
        if not isinstance(case, dict):
            raise ValueError(f"{where} is {json.dumps(case)}, not an object with an 'image' path")
        image, label = case.get("image"), case.get("label")  # none or "": a finding of the data check
        images = image if isinstance(image, list) else [image]
        if image and not all(isinstance(path, str) for path in images):
            raise ValueError(f"{where}: image {json.dumps(image)} is not a path or a list of paths")
        if label and not isinstance(label, str):
            raise ValueError(f"{where}: label {json.dumps(label)} is not a path")
        fold = case.get("fold")
        if fold is not None and (isinstance(fold, bool) or not str(fold).lstrip("-").isdigit()):
            raise ValueError(f"{where}: fold {json.dumps(fold)} is not an integer")


def dataset_facts(datalist: str | Path, dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """The datalist's header (labels, modality, name; never the case lists) and a fingerprint of its
    labelled cases: what a checkpoint carries to describe itself and to recognise its dataset."""
    header = {key: value for key, value in read_json(datalist).items() if key not in CASE_LISTS}
    header["name"] = dataset_name(datalist)
    header[FINGERPRINT_KEY] = case_fingerprint(datalist, dataset_dir)
    return header


def case_fingerprint(datalist: str | Path, dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """Count and hash of the labelled cases' paths (relative to the dataset folder) and file sizes:
    the same for a moved dataset folder, different for other cases or files. No path is stored."""
    base = str(dataset_dir) if dataset_dir else str(Path(datalist).resolve().parent)
    entries = cases(datalist, dataset_dir, role="all")
    digest = hashlib.sha256()
    for case in entries:
        for key in ("image", "label"):
            for path in case[key] if isinstance(case.get(key), list) else [case.get(key)]:
                if path is not None:
                    size = os.path.getsize(path) if os.path.isfile(path) else 0
                    digest.update(f"{key}:{os.path.relpath(path, base)}:{size}\n".encode())
    return {"count": len(entries), "sha256": digest.hexdigest()}


def save_dataset_info(source: Source, out_dir: str | Path) -> Path:
    """Write the dataset facts (or a datalist's header) beside the checkpoints, atomically: a look
    at a model's classes and channels without loading it."""
    header = {key: value for key, value in read_json(source).items() if key not in CASE_LISTS}
    target = Path(out_dir) / DATASET_INFO_FILE
    with atomic_write(target) as handle:
        handle.write((json.dumps(header, indent=2) + "\n").encode())
    return target


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def image_cases(inputs: str | Path | list[str | Path]) -> list[dict]:
    """Inference inputs as dataset entries: each file or DICOM series (``folder[#uid]``) as given,
    each other folder's NIfTI, PNG, TIFF and JPEG files sorted.

    Hidden files are no images: macOS ``._*`` copies (MSD archives ship them) and the partial
    files of a killed writer (``pipeline.io.atomic``) are skipped in folders, refused when named.
    """
    entries = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(item)
        if is_series_path(item):
            entries.append({"image": str(item)})
        elif path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if (p.name.endswith(NIFTI_SUFFIXES) or is_planar(p)) and not p.name.startswith(".")
            )  # fmt: skip
            if not found:
                raise FileNotFoundError(f"input folder {path} holds no NIfTI, PNG, TIFF or JPEG file")
            entries += [{"image": str(p)} for p in found]
        elif path.is_file() and path.name.startswith("."):
            raise ValueError(f"input {path} is a hidden file (a macOS ._ copy or a partial file), no image")
        elif path.is_file():
            entries.append({"image": str(path)})
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not entries:
        raise ValueError("no input images given")
    return entries
