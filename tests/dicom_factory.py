"""Synthetic DICOM series written to disk with pydicom, with a geometry known exactly.

Tests build series in any orientation, spacing and rescale and check readers against ``expected_affine``.
Every slice carries the identifiers in ``IDENTIFIERS``, so tests can assert that none of them leaks.

Conventions: ``volume`` is indexed (x, y, z) = (column, row, slice), the order of SimpleITK's
image index and of a NIfTI array; slice ``k`` lies at ``origin + k * spacing[2] * normal`` with
``normal = cross(row_direction, column_direction)``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

# CT and MR Image Storage; any other modality is written as Secondary Capture.
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}

# Identifying values written into every slice; none may ever appear in outputs or messages.
IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-12345",
    "PatientBirthDate": "19600229",
    "AccessionNumber": "ACC-98765",
    "InstitutionName": "St Nowhere Hospital",
    "ReferringPhysicianName": "Welby^Marcus",
}
# Acquisition fields (not identifying) that a sidecar may carry.
ACQUISITION = {
    "Manufacturer": "Synthetic",
    "ManufacturerModelName": "Factory-1",
    "KVP": "120",
    "ConvolutionKernel": "B30f",
}


def unit(vector: Sequence[float]) -> np.ndarray:
    return np.asarray(vector, dtype=float) / np.linalg.norm(vector)


def ds(values: Sequence[float]) -> list[str]:
    """Decimal strings that fit DICOM's 16-character limit, at the best precision that fits."""
    return [format_number_as_ds(float(value)) for value in values]


def expected_affine(
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    origin: Sequence[float] = (-100, -120, 50),
    row_direction: Sequence[float] = (1, 0, 0),
    column_direction: Sequence[float] = (0, 1, 0),
    ras: bool = False,
) -> np.ndarray:
    """The voxel (x, y, z) -> world (mm) affine of a factory series.

    LPS (DICOM's patient coordinates, what SimpleITK reports) by default; ``ras=True`` gives the
    RAS affine that MONAI's MetaTensor carries (x and y world axes negated).
    """
    row, col = unit(row_direction), unit(column_direction)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row, col, np.cross(row, col)], axis=1) * np.asarray(spacing, dtype=float)
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine if ras else affine


def _slice(geometry: np.ndarray, pixels: np.ndarray, index: int, common: dict) -> Dataset:
    """One slice: ``pixels`` is (x, y); DICOM stores rows first, hence the transpose."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = common["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    data = Dataset()
    data.file_meta = meta
    for key, value in common.items():
        setattr(data, key, value)
    position = geometry @ np.array([0, 0, index, 1.0])
    data.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    data.InstanceNumber = index + 1
    data.ImagePositionPatient = ds(position[:3])
    data.Rows, data.Columns = pixels.shape[1], pixels.shape[0]
    data.PixelData = np.ascontiguousarray(pixels.T.astype("<i2")).tobytes()
    return data


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    origin: Sequence[float] = (-100, -120, 50),
    row_direction: Sequence[float] = (1, 0, 0),
    column_direction: Sequence[float] = (0, 1, 0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    patient_name: str = IDENTIFIERS["PatientName"],
    patient_id: str = IDENTIFIERS["PatientID"],
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 3,
    shuffle: bool = True,
    rng_seed: int = 0,
) -> list[Path]:
    """Write ``volume`` (x, y, z stored int16 values) as one file per slice; returns them in slice order.

    With ``shuffle`` the file names are random, so the directory order is not the slice order
    and a reader must sort by position. HU = stored * slope + intercept.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = expected_affine(spacing, origin, row_direction, column_direction)
    common = {
        **IDENTIFIERS,
        **ACQUISITION,
        "PatientName": patient_name,
        "PatientID": patient_id,
        "SOPClassUID": SOP_CLASSES.get(modality, "1.2.840.10008.5.1.4.1.1.7"),
        "Modality": modality,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "StudyInstanceUID": study_uid or generate_uid(),
        "SeriesInstanceUID": series_uid or generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
        "SeriesNumber": series_number,
        "ImageOrientationPatient": ds([*unit(row_direction), *unit(column_direction)]),
        # DICOM's order: spacing between rows (along the column direction), then between columns.
        "PixelSpacing": ds([spacing[1], spacing[0]]),
        "SliceThickness": format_number_as_ds(float(spacing[2])),
        "RescaleSlope": format_number_as_ds(float(slope)),
        "RescaleIntercept": format_number_as_ds(float(intercept)),
        "RescaleType": "HU",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
    }
    rng, paths = np.random.default_rng(rng_seed), []
    for index in range(volume.shape[2]):
        name = uuid.UUID(bytes=rng.bytes(16)).hex if shuffle else f"slice_{index:04d}"
        path = folder / f"{name}.dcm"
        _slice(geometry, volume[:, :, index], index, common).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
