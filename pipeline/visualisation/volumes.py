"""Volumes as the pictures need them: 3D, in RAS voxel order, and read as little as possible.

Reorienting is a flip/transpose *view* of the stored array (no copy), so a 256^3 scan costs its
decompression and nothing more; the pictures then slice that view and convert only the slices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from monai.data.utils import to_affine_nd
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from pipeline.io.dicom import find_series, is_series_path, read_series, split_series_path
from pipeline.io.geometry import Grid, grid_mismatch
from pipeline.io.names import is_planar
from pipeline.io.readers import channels, sitk_affine

LABEL_DTYPE = np.int16  # float-stored label maps are rounded into this (class indices fit easily)


@dataclass(frozen=True)
class RasVolume:
    """A 3D array in RAS voxel order (axis 0 runs towards the patient's right, 1 anterior, 2 superior).

    ``stored_affine`` is the file's own grid, kept so that voxel indices a user reads off a viewer
    (which shows the stored order) can be translated into this one.
    """

    data: np.ndarray
    affine: np.ndarray
    stored_affine: np.ndarray
    stored_shape: tuple[int, ...]
    source: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        x, y, z = (float(s) for s in nib.affines.voxel_sizes(self.affine)[:3])
        return x, y, z

    def ras_index(self, stored_ijk: Sequence[int]) -> tuple[int, int, int]:
        """A stored voxel index in this RAS order; out-of-range indices are refused, naming the file."""
        inside = len(stored_ijk) == 3 and all(
            0 <= v < n for v, n in zip(stored_ijk, self.stored_shape, strict=True)
        )
        if not inside:
            raise ValueError(
                f"voxel {tuple(stored_ijk)} is outside {self.source} (shape {self.stored_shape})"
            )
        world = self.stored_affine @ np.array([*stored_ijk, 1.0])
        i, j, k = (int(v) for v in np.rint(np.linalg.solve(self.affine, world)[:3]))
        return i, j, k


def as_ras(data: np.ndarray, affine: np.ndarray, source: str) -> RasVolume:
    """Reorient by the closest axis permutation and flips (what viewers show for oblique scans too).
    A 2D image (x, y, with a 3x3 affine) is a volume of one slice."""
    if data.ndim == 2 and np.shape(affine) == (3, 3):
        data, affine = data[..., None], to_affine_nd(3, np.asarray(affine, dtype=float))
    if data.ndim != 3:
        raise ValueError(f"{source} has {data.ndim} dimensions {data.shape}; a 3D volume is needed")
    affine = np.asarray(affine, dtype=float)
    ornt = io_orientation(affine)
    ras = apply_orientation(data, ornt)
    return RasVolume(ras, affine @ inv_ornt_aff(ornt, data.shape), affine, data.shape, source)


def _read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Stored array (no dtype conversion) and affine of a NIfTI file, DICOM series folder or 2D image
    (its first channel: the pictures show one)."""
    if is_series_path(path) or (is_planar(path) and Path(path).is_file()):
        image = read_series(path) if is_series_path(path) else sitk.ReadImage(str(path))
        return channels(image)[0], sitk_affine(image)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a readable NIfTI file or DICOM series ({error})") from None


def _squeeze(data: np.ndarray, path: str | Path, *, labels: bool) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) from some writers
        data = data[..., 0]
    if data.ndim > 3 and not labels:  # multi-channel image: show the first volume
        data = data.reshape(*data.shape[:3], -1)[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"{path} has shape {data.shape}; a 2D image or a 3D volume is needed")
    return data


def load_image(path: str | Path) -> RasVolume:
    """An image in RAS order, in its stored dtype (only displayed slices become float)."""
    data, affine = _read(path)
    return as_ras(_squeeze(data, path, labels=False), affine, str(path))


def load_labels(path: str | Path) -> RasVolume:
    """A label map in RAS order: integer class indices, refused if negative."""
    data, affine = _read(path)
    data = _squeeze(data, path, labels=True)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data).astype(LABEL_DTYPE)
    if data.size and data.min() < 0:
        raise ValueError(f"{path} holds negative values; a label map holds class indices 0, 1, 2, ...")
    return as_ras(data, affine, str(path))


def check_same_grid(image: RasVolume, other: RasVolume) -> None:
    """Fail loudly on shape mismatch (nothing to overlay voxel by voxel); an affine off the image's
    grid only warns: the picture can still be drawn, and the warning says what is misplaced."""
    problem = grid_mismatch(Grid(other.data.shape, other.affine), Grid(image.data.shape, image.affine))
    if problem is None:
        return
    if other.data.shape != image.data.shape:
        raise ValueError(
            f"{other.source} has shape {other.data.shape} but image {image.source} has shape "
            f"{image.data.shape} (after reorienting both to RAS); resample the segmentation to the image grid"
        )
    warnings.warn(f"{other.source} is not on the voxel grid of {image.source}: {problem}", stacklevel=3)


def dicom_modality(path: str | Path) -> str | None:
    """'CT' or 'MRI' from a DICOM series' Modality tag (None for NIfTI), so CT gets its HU window."""
    if not is_series_path(path):
        return None

    folder, uid = split_series_path(path)
    series = find_series(folder)
    files = series.get(uid) if uid else next(iter(series.values()), None)
    if not files:
        return None
    modality = pydicom.dcmread(files[0], stop_before_pixels=True).get("Modality")
    return "CT" if modality == "CT" else "MRI"
