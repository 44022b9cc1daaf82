"""Reading Medical Segmentation Decathlon style datalists, the one input format every bundle takes.

A datalist is a JSON file with a ``labels`` table (index -> name), a ``modality`` table
(channel -> name), a ``training`` list of ``{"image", "label"[, "fold"]}`` entries and an
optional ``test`` list. Paths are relative to the datalist's folder (or to ``dataset_dir``),
so a dataset folder can be moved as a whole.

Training writes the datalist's header (everything but the case lists) next to its checkpoints
as ``dataset.json``: inference then knows the label names, channel count and modality of the
model without the training data being present.
"""

from __future__ import annotations

import json
from pathlib import Path

from monai.data import load_decathlon_datalist

CASE_LISTS = ("training", "validation", "test")
DATASET_INFO_FILE = "dataset.json"
ROLES = ("train", "validation", "test", "all")


def read_json(path: str | Path) -> dict:
    """Load a datalist (or dataset info) file, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or "labels" not in content:
        raise ValueError(f"datalist {path} has no 'labels' table (index -> name), as MSD datalists do")
    return content


def label_names(path: str | Path) -> dict[int, str]:
    """Class index -> name, background included, ordered by index."""
    labels = read_json(path)["labels"]
    names = {int(index): str(name) for index, name in labels.items()}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"datalist {path}: label indices {sorted(names)} are not 0..{len(names) - 1}")
    return names


def num_classes(path: str | Path) -> int:
    return len(label_names(path))


def modality(path: str | Path) -> str:
    """The modality of the first channel ('CT', 'MRI', ...): it selects the intensity normalisation."""
    modalities = read_json(path).get("modality", {"0": "MRI"})
    return str(modalities.get("0", next(iter(modalities.values()))))


def num_channels(path: str | Path) -> int:
    return len(read_json(path).get("modality", {"0": "MRI"}))


def dataset_name(path: str | Path) -> str:
    """A name for the MLflow experiment, so runs of all bundles on one dataset sit side by side."""
    return str(read_json(path).get("name") or Path(path).parent.name)


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


def save_dataset_info(datalist: str | Path, out_dir: str | Path) -> Path:
    """Write the datalist's header (labels, modality, name) beside the checkpoints."""
    header = {key: value for key, value in read_json(datalist).items() if key not in CASE_LISTS}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / DATASET_INFO_FILE
    target.write_text(json.dumps(header, indent=2) + "\n")
    return target


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def image_cases(inputs: str | Path | list[str | Path]) -> list[dict]:
    """Inference inputs as dataset entries: each file or DICOM series (``folder[#uid]``) as given,
    each other folder's NIfTI files sorted."""
    from pipeline.io.dicom import is_series_path

    entries = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(item)
        if is_series_path(item):
            entries.append({"image": str(item)})
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"input folder {path} holds no .nii or .nii.gz file")
            entries += [{"image": str(p)} for p in found]
        elif path.is_file():
            entries.append({"image": str(path)})
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not entries:
        raise ValueError("no input images given")
    return entries
