"""The folder layouts data arrives in, each read into one ``Found``: the cases ``build.py`` lists.

Layouts, recognised by what marks each (``--layout`` skips the detection):

* ``csv``: the path given is a ``.csv`` file with an ``image,label`` header; paths relative to it.
* ``nnunet``: nnU-Net v2 raw data, ``dataset.json`` with ``channel_names`` and ``file_ending``;
  ``imagesTr/<case>_0000<ending>`` (one file per channel), ``labelsTr/<case><ending>``, ``imagesTs``.
* ``msd``: Medical Segmentation Decathlon, any other ``dataset.json`` (``modality``, ``labels``,
  ``training`` list of ``./imagesTr/...`` paths, ``test``).
* ``dicom``: one DICOM series per case folder, with a label file named after the folder:
  ``images/<case>/`` + ``labels/<case>.nii.gz``, or ``<case>/`` + ``<case>_label.nii.gz`` side by side.
  The series folder is the case's image path; ``pipeline.io.readers.InputReader`` loads it.
* ``folders``: ``images/`` and ``labels/`` (or ``image/`` and ``label/``) holding files of the same
  names, extensions ignored: NIfTI and the other volume formats, or 2D PNG, TIFF and JPEG files.

Hidden files (MSD ships macOS ``._*`` copies in some tasks) are ignored everywhere.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from pipeline.io.dicom import find_series, is_series_path
from pipeline.io.names import IMAGE_SUFFIXES, case_name

Image = Path | list[Path]
CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
LOOKED_FOR = (
    "an nnU-Net dataset.json (channel_names, file_ending); an MSD dataset.json; DICOM series folders with "
    "<case>_label.nii.gz beside them, or images/<case>/ + labels/<case>.nii.gz; images/ + labels/ folders "
    "of matching file names; or give a .csv file of image,label rows"
)


@dataclass
class Found:
    """What a layout reader found: absolute paths, plus whatever the dataset itself states."""

    training: dict[str, tuple[Image, Path]]
    test: list[Image] = field(default_factory=list)
    labels: dict[int, str] | None = None
    modality: list[str] | None = None
    name: str | None = None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(folder: Path) -> dict[str, Path]:
    """Case name -> image file; two files of one name (``a.nii`` and ``a.nii.gz``) are ambiguous."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    files: dict[str, Path] = {}
    for path in _visible(folder):
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            if case_name(path) in files:
                raise ValueError(f"{folder}: {files[case_name(path)].name} and {path.name} are one case")
            files[case_name(path)] = path
    return files


def listing(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def _check_matched(where: str, images: dict, labels: dict) -> None:
    """Any file left over is an error: a silently dropped case is worse than a question."""
    lonely_images, lonely_labels = sorted(images.keys() - labels), sorted(labels.keys() - images)
    if lonely_images or lonely_labels:
        raise ValueError(
            f"{where} do not match by name: images without a label: "
            f"{listing(lonely_images)}; labels without an image: {listing(lonely_labels)}"
        )


def _pair_by_name(images_dir: Path, labels_dir: Path) -> dict[str, tuple[Image, Path]]:
    images, labels = _image_files(images_dir), _image_files(labels_dir)
    _check_matched(f"{images_dir} and {labels_dir}", images, labels)
    return {name: (images[name], labels[name]) for name in images}


def _label_table(raw: dict, source: Path) -> dict[int, str]:
    """Index -> name from MSD's ``{"0": "background"}`` or nnU-Net's ``{"background": 0}``."""
    if all(str(key).isdigit() for key in raw):
        table = {int(key): str(name) for key, name in raw.items()}
    elif all(isinstance(value, int) for value in raw.values()):
        table = {value: str(name) for name, value in raw.items()}
    else:
        raise ValueError(f"{source}: labels {raw} are neither index -> name nor name -> index (regions?)")
    if sorted(table) != list(range(len(table))):
        raise ValueError(f"{source}: label indices {sorted(table)} are not 0..{len(table) - 1}")
    return table


def _dataset_json(root: Path) -> dict:
    try:
        return json.loads((root / "dataset.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{root / 'dataset.json'} is not valid JSON: {error}") from None


def _by_index(table: dict) -> list[str]:
    return [str(table[key]) for key in sorted(table, key=int)]


def _read_msd(root: Path, image_dir: str, label_dir: str) -> Found:
    """Cases as dataset.json lists them (it names the cases; imagesTr may hold junk beside them)."""
    info, source = _dataset_json(root), root / "dataset.json"
    if "labels" not in info or "modality" not in info:
        raise ValueError(f"{source} has no 'labels' or 'modality' table, as MSD dataset.json files do")
    if "training" in info:
        if not all(isinstance(item, dict) and {"image", "label"} <= item.keys() for item in info["training"]):
            raise ValueError(f"{source}: every 'training' entry needs an 'image' and a 'label'")
        pairs = [(root / item["image"], root / item["label"]) for item in info["training"]]
        training = {case_name(image): (image, label) for image, label in pairs}
    else:
        training = _pair_by_name(root / "imagesTr", root / "labelsTr")
    tests = [root / (item if isinstance(item, str) else item["image"]) for item in info.get("test", [])]
    return Found(
        {name: pair for name, pair in training.items() if not name.startswith(".")},
        [path for path in tests if not path.name.startswith(".")],
        labels=_label_table(info["labels"], source),
        modality=_by_index(info["modality"]),
        name=info.get("name"),
    )


def _channel_groups(folder: Path, ending: str, channels: int) -> dict[str, Image]:
    """nnU-Net's ``<case>_<XXXX><ending>`` files grouped by case; every case needs every channel."""
    groups: dict[str, dict[int, Path]] = {}
    for path in _visible(folder) if folder.is_dir() else []:
        if not path.name.endswith(ending):
            continue
        match = CHANNEL_NAME.match(path.name[: -len(ending)])
        if not match:
            raise ValueError(f"{path}: nnU-Net image names end in _XXXX{ending} (the channel index)")
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    for case, files in groups.items():
        if sorted(files) != list(range(channels)):
            raise ValueError(
                f"{folder}: case {case} has channels {sorted(files)}; channel_names wants 0..{channels - 1}"
            )
    return {
        case: files[0] if channels == 1 else [files[c] for c in range(channels)]
        for case, files in groups.items()
    }


def _read_nnunet(root: Path, image_dir: str, label_dir: str) -> Found:
    """Multi-channel cases become a list of images, which MONAI's LoadImaged stacks as channels."""
    info, source = _dataset_json(root), root / "dataset.json"
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in info]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}, which nnU-Net v2 dataset.json files have")
    ending, channels = info["file_ending"], _by_index(info["channel_names"])
    images = _channel_groups(root / "imagesTr", ending, len(channels))
    tests = _channel_groups(root / "imagesTs", ending, len(channels))
    return Found(
        {case: (image, root / "labelsTr" / f"{case}{ending}") for case, image in images.items()},
        [tests[case] for case in sorted(tests)],
        labels=_label_table(info["labels"], source),
        modality=channels,
        name=info.get("name"),
    )


def _read_folders(root: Path, image_dir: str, label_dir: str) -> Found:
    return Found(_pair_by_name(root / image_dir, root / label_dir))


def _read_csv(path: Path, image_dir: str, label_dir: str) -> Found:
    """Rows of ``image,label``; the image path as written names the case (file names may repeat)."""
    if not path.is_file():
        raise ValueError(f"{path} is a folder; the csv layout takes the .csv file itself")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, skipinitialspace=True))
    if not rows or not {"image", "label"} <= rows[0].keys():
        raise ValueError(f"{path} needs a header row with 'image' and 'label' columns and one row per case")
    training: dict[str, tuple[Image, Path]] = {}
    for number, row in enumerate(rows, start=2):
        if not row["image"] or not row["label"]:
            raise ValueError(f"{path}, line {number}: both image and label are needed")
        if row["image"] in training:
            raise ValueError(f"{path}, line {number}: image {row['image']} is listed twice")
        training[row["image"]] = (path.parent / row["image"], path.parent / row["label"])
    return Found(training, name=path.parent.name)


def _series_modality(folder: Path) -> str:
    """The series' Modality tag, in the pipeline's words (MR -> MRI); a folder must hold one series."""
    series = find_series(folder)
    if len(series) != 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series; a case folder must hold exactly one")
    first = next(iter(series.values()))[0]
    modality = str(pydicom.dcmread(first, stop_before_pixels=True).get("Modality", ""))
    return {"MR": "MRI", "": "unknown"}.get(modality, modality)


def _read_dicom(root: Path, image_dir: str, label_dir: str) -> Found:
    """A series folder is the case's image path: the bundles' reader loads it as one volume."""
    nested = (root / image_dir).is_dir()
    series_root, label_root = (root / image_dir, root / label_dir) if nested else (root, root)
    series = {path.name: path for path in _visible(series_root) if path.is_dir() and is_series_path(path)}
    files = _image_files(label_root).items()
    labels = {name.removesuffix("_label"): path for name, path in files if nested or name.endswith("_label")}
    where = (
        f"{series_root} and {label_root}" if nested else f"series folders and <case>_label files in {root}"
    )
    _check_matched(where, series, labels)
    modalities = {_series_modality(folder) for folder in series.values()}
    stated = modalities.pop() if len(modalities) == 1 else "unknown"
    return Found({name: (series[name], labels[name]) for name in series}, modality=[stated])


READERS: dict[str, Callable[[Path, str, str], Found]] = {
    "csv": _read_csv,
    "nnunet": _read_nnunet,
    "msd": _read_msd,
    "dicom": _read_dicom,
    "folders": _read_folders,
}


SINGULAR = {"images": "image", "labels": "label"}  # the ISBI 2012 stack's and others' folder names


def folder_names(root: Path, image_dir: str, label_dir: str) -> tuple[str, str]:
    """``image_dir``/``label_dir``, or their singular forms where only those exist (``image/`` +
    ``label/``, as microscopy datasets often name them)."""
    if root.is_dir() and not (root / image_dir).is_dir():
        singular = SINGULAR.get(image_dir, image_dir), SINGULAR.get(label_dir, label_dir)
        if all((root / name).is_dir() for name in singular):
            return singular
    return image_dir, label_dir


def detect_layout(root: Path, image_dir: str = "images", label_dir: str = "labels") -> str:
    """The layout of ``root``, by the files that mark each one (see the module docstring)."""
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise ValueError(f"{root} is a file, but not a .csv of image,label rows")
    if (root / "dataset.json").is_file():
        return "nnunet" if "channel_names" in _dataset_json(root) else "msd"
    images = root / image_dir
    if images.is_dir() and (root / label_dir).is_dir():
        return "dicom" if any(is_series_path(p) for p in _visible(images) if p.is_dir()) else "folders"
    if any(is_series_path(p) for p in _visible(root) if p.is_dir()):
        return "dicom"
    raise ValueError(f"no dataset layout recognised in {root}; looked for {LOOKED_FOR}")
