"""A run folder belongs to one training at a time and to one dataset.

``claim_run_folder`` takes an exclusive lock (a second process stops, naming the holder's pid) and
refuses a datalist whose labels, channels or training cases differ from those the folder's checkpoint
was trained on, before anything in the folder is overwritten; only the lock's holder removes the
half-written files of a killed run, since another process's could be mid-write.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.datalist import (
    DATASET_INFO_FILE,
    FINGERPRINT_KEY,
    label_names,
    num_channels,
    save_dataset_info,
)
from pipeline.io.atomic import stale_temporaries
from pipeline.io.checkpoint import CheckpointError, dataset_facts

LATEST_FILE = "latest.pt"
BEST_FILE = "model.pt"  # the model zoo's name: the network's state dict, with its dataset facts
LOCK_FILE = "training.lock"  # held (flock) by the training writing into the folder; holds its pid
_HELD: dict[Path, int] = {}  # run folders this process holds the lock of -> the lock file's descriptor


class RunFolderBusy(ValueError):
    """Another process is training into the same run folder."""


def lock_run_folder(ckpt_dir: str | Path) -> None:
    """Take the run folder's exclusive lock for this process (again: no-op), or raise RunFolderBusy
    naming the holder's pid. The kernel drops the lock when the process dies, even by SIGKILL."""
    folder = Path(ckpt_dir).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {folder} is in use by another training (pid {holder}); wait for it to end, "
                "or train into another --output"
            ) from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the one now there
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[folder] = fd


def release_run_folder(ckpt_dir: str | Path) -> None:
    """Give the lock back and remove its file (removed first, so no one locks a file about to go)."""
    fd = _HELD.pop(Path(ckpt_dir).resolve(), None)
    if fd is not None:
        (Path(ckpt_dir).resolve() / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)


def claim_run_folder(ckpt_dir: str | Path, dataset: Mapping[str, Any], datalist: str | Path) -> bool:
    """Before a training writes anything into ``ckpt_dir``: lock it, check that a checkpoint there
    was trained on ``dataset`` (the facts of ``datalist``), remove half-written files of a killed
    run, and only then write ``dataset.json``. Called by train.yaml's ``initialize``."""
    lock_run_folder(ckpt_dir)
    latest = Path(ckpt_dir) / LATEST_FILE
    if latest.exists():
        require_same_dataset(latest, _recorded_dataset(latest), dataset, datalist)
    remove_stale_temporaries(ckpt_dir)
    save_dataset_info(dataset, ckpt_dir)
    return True


def _recorded_dataset(latest: Path) -> Mapping[str, Any] | None:
    """The facts ``latest.pt`` was trained on (inside it, or an older run's dataset.json beside it)."""
    try:
        return dataset_facts(latest)
    except CheckpointError as error:
        if "no dataset facts" not in str(error):
            raise
        return None


def require_same_dataset(
    checkpoint: Path, recorded: Mapping[str, Any] | None, dataset: Mapping[str, Any], datalist: str | Path
) -> None:
    """A resume continues the run in its folder on the data it started on: other labels, channels or
    training cases raise a ValueError naming the folder, the datalist and the difference."""
    if not recorded:
        return
    differences = []
    if label_names(recorded) != label_names(dataset):
        differences.append(f"labels {_labels(recorded)} there, {_labels(dataset)} in the datalist")
    if num_channels(recorded) != num_channels(dataset) or recorded.get("modality") != dataset.get("modality"):
        differences.append(
            f"modality {recorded.get('modality')} there, {dataset.get('modality')} in the datalist"
        )
    before, now = recorded.get(FINGERPRINT_KEY), dataset.get(FINGERPRINT_KEY)
    if before and now and before != now:
        differences.append(
            f"other training cases ({before['count']} cases there, {now['count']} in the datalist, "
            "or other files)"
        )
    if differences:
        raise ValueError(
            f"run folder {checkpoint.parent} holds a training on another dataset than {datalist}: "
            f"{'; '.join(differences)}. Train into another --output, or delete the folder to start over"
        )


def _labels(facts: Mapping[str, Any]) -> str:
    return ",".join(label_names(facts).values())


def remove_stale_temporaries(ckpt_dir: str | Path) -> None:
    """Half-written checkpoints of a process killed while saving (never under the final name); only
    the lock's holder may remove them, as another process's could be in the middle of a write."""
    if Path(ckpt_dir).resolve() not in _HELD:
        raise RuntimeError(f"run folder {ckpt_dir} is not locked by this process")
    for name in (LATEST_FILE, BEST_FILE, DATASET_INFO_FILE):
        for path in stale_temporaries(ckpt_dir, name):
            path.unlink(missing_ok=True)
