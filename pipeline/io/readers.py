"""The MONAI image reader the bundles load with: NIfTI files and DICOM series folders, one ``reader``.

Why not MONAI's own ``PydicomReader`` for series: it stacks slices in InstanceNumber order (a
scrambled or restarted numbering scrambles the volume), reads every series in a folder into one
stack, takes a missing slice silently as a wider spacing, and knows no way to pick one series.
(``ITKReader`` would do better, but it needs the ``itk`` package; SimpleITK is what we have.)

Why reading happens in ``get_data`` and not in ``read``: ``LoadImage`` catches any error raised
by ``read`` and quietly tries its other readers, so a clear "slice missing" from ours would be
replaced by PydicomReader loading the broken folder. Errors from ``get_data`` reach the user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader
from monai.data.folder_layout import default_name_formatter
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from pipeline.io.dicom import is_series_path, read_series, split_series_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def sitk_affine(image: sitk.Image, lps_to_ras: bool = True) -> np.ndarray:
    """Voxel index (x, y, z) -> world mm; SimpleITK's geometry is LPS, MONAI's MetaTensors are RAS."""
    dim = image.GetDimension()
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = np.reshape(image.GetDirection(), (dim, dim)) * np.asarray(image.GetSpacing())
    affine[:dim, dim] = image.GetOrigin()
    return orientation_ras_lps(affine) if lps_to_ras else affine


def _is_nifti(path: str) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


class NiftiOrDicomReader(ImageReader):
    """NIfTI through MONAI's NibabelReader (unchanged behaviour), DICOM series through ``read_series``.

    Name it in a config as ``reader: pipeline.io.readers.NiftiOrDicomReader``. Several paths for
    one key are stacked as channels, as MONAI's readers do. Other files (``.npy``, ``.png``) are
    declined in ``read`` so that LoadImage falls back to its default readers for them.
    """

    def __init__(self, **nibabel_kwargs) -> None:
        super().__init__()
        self.nibabel = NibabelReader(**nibabel_kwargs)

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(_is_nifti(name) or is_series_path(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs) -> tuple[str, ...]:
        """Only the paths: the reading is done in ``get_data`` (see the module docstring)."""
        paths = tuple(str(path) for path in ensure_tuple(data))
        if not self.verify_suffix(paths):
            raise ValueError(f"{paths}: neither NIfTI files nor DICOM series folders")
        return paths

    def get_data(self, img: tuple[str, ...]) -> tuple[np.ndarray, dict]:
        if all(_is_nifti(path) for path in img):
            return self.nibabel.get_data(self.nibabel.read(img))
        images = [read_series(path) if is_series_path(path) else sitk.ReadImage(path) for path in img]
        affine = sitk_affine(images[0])
        for path, image in zip(img[1:], images[1:], strict=True):
            same_grid = image.GetSize() == images[0].GetSize()
            if not same_grid or not np.allclose(sitk_affine(image), affine, atol=1e-4):
                raise ValueError(f"{path} does not share the grid of {img[0]}; cannot stack them as channels")
        arrays = [sitk.GetArrayFromImage(image).T for image in images]
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0,
        }
        return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta


def series_name_formatter(metadict: dict, saver: object) -> dict:
    """SaveImaged's ``output_name_formatter``: MONAI's default, with DICOM series paths kept whole.

    MONAI takes the subject's last dotted part for an extension and drops it, so a series folder
    named by its UID (``1.2.840.1.7``) or a ``folder#uid`` path would lose its last UID component
    and sibling series would overwrite each other's outputs. A series gets ``<folder>[_<uid hash>]``.
    """
    names = default_name_formatter(metadict, saver)
    if is_series_path(names["subject"]):
        folder, uid = split_series_path(names["subject"])
        tail = f"_{hashlib.sha256(uid.encode()).hexdigest()[:8]}" if uid else ""
        names["subject"] = str(Path(folder).parent / f"{folder.name}{tail}.series")  # suffix dropped by MONAI
    return names
