"""Building the MSD-style datalist (see ``datalist.py``) from the folder layouts data arrives in.

The layouts, and how each is recognised and read, are in ``layouts.py``; here the header (name,
modality per channel, label names), the folds or validation list, and the ``medseg datalist``
command. Case paths are written relative to the datalist's folder, so a dataset folder with its
datalist can move.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path, PurePath

import numpy as np
import SimpleITK as sitk

from pipeline.data.datalist import MASK_WHITE
from pipeline.data.layouts import READERS, Found, Image, detect_layout, folder_names


def _check_files(found: Found, root: Path, layout: str) -> None:
    if not found.training:
        raise ValueError(f"{root}: the {layout} layout found no labelled cases")
    cases = [(name, [image, label]) for name, (image, label) in sorted(found.training.items())]
    for name, paths in cases + [("test", [image]) for image in found.test]:
        for path in [p for item in paths for p in (item if isinstance(item, list) else [item])]:
            if not path.exists():
                raise FileNotFoundError(f"{path} (case {name}) does not exist")


# Bounds on what a label file may hold: class indices, not intensities (an image put in labels/).
MAX_LABEL_VALUE = 65535
MAX_LABEL_CLASSES = 1000


def _label_values(path: Path) -> set[int]:
    """Label values present in one file. The maximum is checked before ``np.unique`` sorts the voxels,
    so an intensity image in ``labels/`` is refused in one pass, with no array sized by its values."""
    image = sitk.ReadImage(str(path))  # kept alive: the view below does not own its memory
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"label file {path} holds non-numeric values ({array.dtype})")
    low, high = array.min(), array.max()
    if low < 0 or high > MAX_LABEL_VALUE:
        raise ValueError(
            f"label file {path} holds values from {low} to {high}; class indices are 0 to at most "
            f"{MAX_LABEL_VALUE} (is it an image?)"
        )
    values = np.unique(array)
    if array.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise ValueError(f"label file {path} holds non-integer values; is it an image?")
    if len(values) > MAX_LABEL_CLASSES:
        raise ValueError(f"label file {path} holds {len(values)} distinct values; is it an image?")
    return {int(value) for value in values}


def labels_from_files(paths: list[Path]) -> dict[int, str]:
    """``class_N`` for every index up to the largest value found, so an index is its label value;
    masks of 0 and 255 are one class (``mask_values`` states it in the header).

    Indices must be mostly used: a mask saved as 0/255 would otherwise become 256 classes, 254 of
    them never seen, and a network trained with that many outputs."""
    found = {path: _label_values(path) for path in paths}
    values = set().union(*found.values())
    if values == {0, MASK_WHITE}:  # a binary mask in the microscopy convention: header label_values
        return {0: "background", 1: "foreground"}
    if max(values) == 0:
        raise ValueError(f"the label files ({paths[0].parent} ...) hold only background (0)")
    unused = max(values) + 1 - len(values)
    if unused > max(len(values), 8):
        highest = next(path for path, present in found.items() if max(values) in present)
        raise ValueError(
            f"label file {highest} holds the value {max(values)}, and the label files hold only "
            f"{', '.join(map(str, sorted(values)[:10]))}: as class indices that is {max(values) + 1} "
            f"classes, {unused} of them never used. Relabel to 0, 1, 2, ... (a mask saved as 0/255?)"
        )
    return {index: "background" if index == 0 else f"class_{index}" for index in range(max(values) + 1)}


def mask_values(paths: list[Path]) -> dict[str, int] | None:
    """The header's ``label_values`` for masks of 0 and 255 (255 is class 1), else None."""
    values = set().union(*(_label_values(path) for path in paths))
    return {"0": 0, str(MASK_WHITE): 1} if values == {0, MASK_WHITE} else None


def _channels(images: list[Image]) -> int:
    """Channels of single-file images from their headers (a 4D NIfTI holds them all); all must agree."""
    counts = {}
    for image in images:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        reader.ReadImageInformation()
        size = reader.GetSize()
        counts[image] = size[3] if len(size) == 4 else reader.GetNumberOfComponents()
    if len(set(counts.values())) > 1:
        raise ValueError(f"images have different channel counts: {counts}")
    return next(iter(counts.values()))


def _modalities(given: str | None, stated: list[str] | None, channels: int) -> list[str]:
    """Per channel: the option (one name for all, or comma-separated), else the dataset's, else 'unknown'."""
    if given is None:
        return stated or ["unknown"] * channels
    names = [name.strip() for name in given.split(",")]
    if len(names) == 1:
        return names * channels
    if len(names) != channels:
        raise ValueError(f"{len(names)} modalities given ({given}) for {channels} channels")
    return names


def _shuffled(names: list[str], seed: int) -> list[str]:
    """Sorted first, so the order depends on the names and the seed only, never on directory order."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return order


def assign_folds(names: list[str], folds: int, seed: int) -> dict[str, int]:
    """Round-robin over the seeded shuffle: same seed, same folds; fold sizes differ by one at most."""
    if not 2 <= folds <= len(names):
        raise ValueError(f"--folds must be between 2 and the number of cases ({len(names)}), not {folds}")
    return {name: index % folds for index, name in enumerate(_shuffled(names, seed))}


def validation_cases(names: list[str], fraction: float, seed: int) -> set[str]:
    """The first round(fraction * N) cases of the seeded shuffle that folds use."""
    count = round(fraction * len(names))
    if not 1 <= count < len(names):
        raise ValueError(f"--val-fraction {fraction} leaves {count} of {len(names)} cases for validation")
    return set(_shuffled(names, seed)[:count])


def relative(path: PurePath, base: PurePath) -> str:
    """``path`` relative to ``base`` with forward slashes, so a datalist written on Windows works anywhere."""
    if path.anchor != base.anchor:
        raise ValueError(f"{path} is not on the drive of the datalist's folder {base}; write it there")
    return PurePath(os.path.relpath(path, base)).as_posix()


def _entry(image: Image, label: Path | None, base: Path) -> dict:
    images = [relative(p, base) for p in image] if isinstance(image, list) else relative(image, base)
    return {"image": images} if label is None else {"image": images, "label": relative(label, base)}


def _case_lists(found: Found, base: Path, folds: int, val_fraction: float | None, seed: int) -> dict:
    names = sorted(found.training)
    entries = {name: _entry(*found.training[name], base) for name in names}
    lists: dict = {"test": [_entry(image, None, base) for image in found.test]}
    if val_fraction is not None:
        held = validation_cases(names, val_fraction, seed)
        lists["training"] = [entries[name] for name in names if name not in held]
        lists["validation"] = [entries[name] for name in names if name in held]
    else:
        fold_of = assign_folds(names, folds, seed)
        lists["training"] = [{**entries[name], "fold": fold_of[name]} for name in names]
    return lists


def _header(found: Found, root: Path, layout: str, labels: list[str] | None, modality: str | None) -> dict:
    """Name, modality per channel and label names: the options win, then the dataset, then the files."""
    single = [image for image, _ in found.training.values() if not isinstance(image, list)]
    channels = len(found.modality) if found.modality else _channels(single)
    label_files = [label for _, label in found.training.values()]
    names = dict(enumerate(labels)) if labels else found.labels or labels_from_files(label_files)
    values = None if found.labels else mask_values(label_files)
    return {
        "name": found.name or root.name,
        "description": f"built by medseg datalist from the {layout} layout of {root.name}",
        "modality": {str(i): name for i, name in enumerate(_modalities(modality, found.modality, channels))},
        "labels": {str(index): name for index, name in sorted(names.items())},
        **({"label_values": values} if values else {}),
        "numTraining": len(found.training),
        "numTest": len(found.test),
    }


def build_datalist(
    root: Path,
    out: Path,
    *,
    layout: str | None = None,
    folds: int = 5,
    val_fraction: float | None = None,
    seed: int = 0,
    labels: list[str] | None = None,
    modality: str | None = None,
    image_dir: str = "images",
    label_dir: str = "labels",
) -> Path:
    """Write the datalist of the dataset at ``root`` (a folder, or a CSV file) to ``out``.

    Folds come from a seeded shuffle of the sorted case names, so the split depends on the cases
    and the seed only, never on directory order. ``modality`` is one name or one per channel,
    comma-separated. ``image_dir``/``label_dir`` name the folders of the folders and dicom layouts.
    """
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.exists():
        raise FileNotFoundError(f"dataset {root} does not exist")
    image_dir, label_dir = folder_names(root, image_dir, label_dir)
    layout = layout or detect_layout(root, image_dir, label_dir)
    if layout not in READERS:
        raise ValueError(f"unknown layout {layout!r}; the layouts are {', '.join(READERS)}")
    if out == root / "dataset.json" or out.is_dir():
        raise ValueError(f"{out} is the dataset's own description or a folder; name a new .json file")
    found = READERS[layout](root, image_dir, label_dir)
    _check_files(found, root, layout)
    content = {
        **_header(found, root, layout, labels, modality),
        **_case_lists(found, out.parent, folds, val_fraction, seed),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(content, indent=2) + "\n")
    return out
