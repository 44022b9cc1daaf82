"""How an image file's name gives its case name: the file name without its image extension.

Images and labels are paired by it (``pipeline.data.layouts``) and outputs are named after it
(``pipeline.io.readers``), so it lives once, here.
"""

from __future__ import annotations

from pathlib import PurePath

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def case_name(path: PurePath) -> str:
    """The file name without its image extension, which is how images and labels are paired."""
    suffix = next((end for end in IMAGE_SUFFIXES if path.name.lower().endswith(end)), "")
    return path.name[: len(path.name) - len(suffix)]
