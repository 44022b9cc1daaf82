"""Download path for the standard Medical Segmentation Decathlon tasks.

URLs and checksums come from MONAI's own table (`DecathlonDataset.resource` / `.md5`) rather
than being copied here, so a MONAI upgrade that moves a mirror fixes us too.  We call MONAI's
`download_url` and `extractall` — the two halves of `download_and_extract` — instead of
`download_and_extract` itself, because the latter first sends an HTTP HEAD through `requests`
to guess the file name, which fails for ``file://`` URLs (local mirrors, tests) and is not needed
when we name the archive ourselves.  A checksum mismatch raises MONAI's `HashCheckError`
(a `ValueError`) before anything is extracted; we let it through unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from monai.apps import DecathlonDataset
from monai.apps.utils import download_url, extractall


def _friendly(task: str) -> str:
    """'Task08_HepaticVessel' -> 'msd-hepatic-vessel' (CamelCase becomes kebab-case)."""
    words = re.findall(r"[A-Z][a-z0-9]*", task.split("_", 1)[1])
    return "msd-" + "-".join(w.lower() for w in words)


def msd_tasks() -> dict[str, str]:
    """Every accepted name (friendly and Task name) mapped to its Task name, from MONAI's table."""
    tasks = {task: task for task in DecathlonDataset.resource}
    tasks.update({_friendly(task): task for task in DecathlonDataset.resource})
    return tasks


def resolve_task(name: str) -> str:
    """Task name for a friendly or Task name; ValueError listing the valid names otherwise."""
    tasks = msd_tasks()
    if name not in tasks:
        raise ValueError(f"unknown MSD dataset {name!r}; valid names: {', '.join(sorted(tasks))}")
    return tasks[name]


def download_msd(name: str, root_dir: Path, *, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch and unpack an MSD task under `root_dir`; returns the task folder.

    `url`/`md5` override MONAI's mirror (for a local copy or a test archive).  The archive is
    deleted after a successful extraction because the tasks are large (Task01 is ~7 GB) and the
    extracted folder with its dataset.json is what marks the task as done.
    """
    task = resolve_task(name)
    root_dir = Path(root_dir)
    task_dir = root_dir / task
    if (task_dir / "dataset.json").is_file():
        return task_dir
    archive = root_dir / f"{task}.tar"
    download_url(
        url=url or DecathlonDataset.resource[task],
        filepath=archive,
        hash_val=md5 or DecathlonDataset.md5[task],
        hash_type="md5",
    )
    extractall(filepath=archive, output_dir=root_dir, hash_val=None, file_type="tar")
    if not (task_dir / "dataset.json").is_file():
        raise RuntimeError(
            f"{archive} did not yield {task_dir / 'dataset.json'}; if {task_dir} is left over from an "
            "interrupted run, delete it and retry"
        )
    archive.unlink()
    return task_dir
