"""How an image file's name gives its case name: the file name without its image extension.

Images and labels are paired by it (``pipeline.data.layouts``) and outputs are named after it
(``pipeline.io.readers``), so it lives once, here.
"""

from __future__ import annotations

from pathlib import PurePath

# 2D formats of microscopy and photographs: SimpleITK reads them (pipeline.io.readers), and a
# segmentation of one is written in its own format (pipeline.inference.batch.output_extension).
PLANAR_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", *PLANAR_SUFFIXES)


def is_planar(path: str | PurePath) -> bool:
    """A file in one of the 2D formats (a multi-page TIFF may still hold a stack)."""
    return str(path).lower().endswith(PLANAR_SUFFIXES)


def case_name(path: PurePath) -> str:
    """The file name without its image extension, which is how images and labels are paired."""
    suffix = next((end for end in IMAGE_SUFFIXES if path.name.lower().endswith(end)), "")
    return path.name[: len(path.name) - len(suffix)]
