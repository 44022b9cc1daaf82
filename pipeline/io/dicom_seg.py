"""DICOM Segmentation objects (highdicom) over the source series, for PACS viewers and 3D Slicer.

Input convention: the label map is a NIfTI file (or a nibabel image) with its own affine, exactly
what inference writes (RAS, MONAI/nibabel convention). It is never trusted for axis order: each
pixel centre of every source instance is carried through world coordinates (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing; LPS) into the label volume's voxel grid and sampled with
nearest neighbour, so slice order, flips, transposes and oblique planes cannot go wrong.

Refusals (``ValueError`` subclasses, naming the files): a folder holding several series or none;
a label volume that does not cover every source pixel (a different series or frame of reference;
a NIfTI carries no frame-of-reference UID, so geometry is the only evidence); label values with
no name; and a label map without foreground (``EmptySegmentationError``): a SEG with no segment
is not valid DICOM, so the caller decides what "nothing found" means for its PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from pipeline.io.atomic import atomic_write

log = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
REFERENCE_UIDS += ("FrameOfReferenceUID",)
# Type 2 (present, possibly empty) patient/study attributes highdicom copies without a fallback.
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber")
TYPE2_COPIED += ("StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
SEG_SERIES_NUMBER = 9001  # sorts after the acquired series in viewers' series lists
# Distinct display colours (RGB), cycled; viewers otherwise draw every generic "Organ" alike.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))
try:
    PACKAGE_VERSION = version("medseg-pipeline")
except PackageNotFoundError:  # a source tree that was never installed
    PACKAGE_VERSION = "unknown"


class DicomSegError(ValueError):
    """A segmentation that cannot be written as a SEG over this series; the message names the files."""


class EmptySegmentationError(DicomSegError):
    """The label map has no foreground on the source series; no SEG was written."""


def write_dicom_seg(
    seg_nifti: str | Path | nib.spatialimages.SpatialImage,
    series_dir: str | Path,
    out_path: str | Path,
    label_names: Mapping[int, str],
    *,
    algorithm_name: str = "medseg-pipeline",
    algorithm_version: str = PACKAGE_VERSION,
    series_description: str = "Segmentation",
    series_uid: str | None = None,
) -> Path:
    """Write ``seg_nifti`` as a BINARY SEG referencing the series in ``series_dir``; returns ``out_path``.
    ``series_uid`` picks one series of a folder holding several (a ``folder#uid`` input).

    One segment per foreground label present on the source frames, numbered 1..N in label order
    (DICOM wants consecutive segment numbers); each keeps its name as SegmentLabel and its label
    value in SegmentDescription. The SEG copies the source's patient and study modules, as DICOM
    requires for it to file under the same study; nothing identifying is logged.
    """
    series_dir, out_path = Path(series_dir), Path(out_path)
    source = _read_series(series_dir, exclude=out_path, series_uid=series_uid)
    labels, vox_from_lps, label_source = _load_labels(seg_nifti)
    frames = _resample_onto(source, labels, vox_from_lps, f"{label_source} onto {series_dir}")
    values = [int(v) for v in np.unique(frames) if v != 0]
    if not values:
        raise EmptySegmentationError(f"{label_source} has no foreground on the series in {series_dir}")
    names = {int(key): str(name) for key, name in label_names.items()}
    unnamed = sorted(set(values) - set(names))
    if unnamed:
        raise DicomSegError(f"{label_source} holds labels {unnamed} that label_names does not name")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=_relabel(frames, values),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_describe(i + 1, v, names[v], algorithm) for i, v in enumerate(values)],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg-pipeline",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="none",
        omit_empty_frames=True,
        series_description=series_description,
    )
    with atomic_write(out_path) as handle:  # a PACS watcher never sees half a SEG
        seg.save_as(handle, enforce_file_format=True)
    log.info("wrote DICOM SEG %s: %d segment(s) over %d source instances", out_path, len(values), len(source))
    return out_path


def _read_series(series_dir: Path, exclude: Path, series_uid: str | None = None) -> list[Dataset]:
    """Headers of the one single-frame image series in the folder (or the one ``series_uid`` names),
    sorted along the slice normal.

    Files that are not DICOM or carry no plane geometry (DICOMDIR, notes) are skipped; a second
    series is refused rather than guessed at, since a SEG references exactly one.
    """
    if not series_dir.is_dir():
        raise DicomSegError(f"DICOM series folder {series_dir} does not exist")
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in series_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.resolve() == exclude.resolve():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in header and "ImageOrientationPatient" in header:
            for key in TYPE2_COPIED:  # often absent from real files; empty is what DICOM allows
                header.setdefault(key, None)
            by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomSegError(f"{series_dir} holds no image series {series_uid}")
        by_series = {series_uid: by_series[series_uid]}
    if len(by_series) != 1:
        found = "; ".join(f"{uid}: {len(v)} files, e.g. {v[0][0].name}" for uid, v in by_series.items())
        raise DicomSegError(
            f"{series_dir} must hold exactly one image series, found {len(by_series)}: {found}"
        )
    (items,) = by_series.values()
    _check_references(items, series_dir)
    multi = [path.name for path, header in items if int(header.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise DicomSegError(f"multi-frame instances are not supported, in {series_dir}: {multi[:3]}")
    return [header for _, header in sorted(items, key=lambda item: _slice_position(item[1]))]


def _check_references(items: list[tuple[Path, Dataset]], series_dir: Path) -> None:
    """A SEG points at its source by these UIDs; de-identification sometimes blanks them."""
    for path, header in items:
        missing = [key for key in REFERENCE_UIDS if not str(header.get(key, "") or "").strip()]
        if missing:
            raise DicomSegError(
                f"{path} in {series_dir} has no {', '.join(missing)} (blanked by de-identification?); "
                "a SEG cannot reference instances without them"
            )


def _slice_position(header: Dataset) -> float:
    """Frame order by place along the normal: file names and InstanceNumber need not follow it."""
    orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
    return float(np.cross(orientation[:3], orientation[3:]) @ np.asarray(header.ImagePositionPatient, float))


def _load_labels(seg: str | Path | nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray, str]:
    """Integer labels (i, j, k), the LPS world -> voxel matrix, and a name for messages.

    Refuses fractional or negative values: probabilities or a wrong file would otherwise be
    silently truncated into plausible-looking labels.
    """
    image = nib.load(seg) if isinstance(seg, str | Path) else seg
    name = str(seg) if isinstance(seg, str | Path) else "the label image"
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomSegError(f"{name} must be a 3D label map, its shape is {data.shape}")
    # Slice by slice, so a float32 CT-sized volume is not copied whole to check it.
    fractional = not np.issubdtype(data.dtype, np.integer) and any(
        not np.array_equal(plane, np.rint(plane)) for plane in data
    )
    if fractional or data.min() < 0:
        raise DicomSegError(f"{name} must hold non-negative integer labels, not fractional or negative ones")
    labels = data.astype(np.min_scalar_type(int(data.max())))
    return labels, np.linalg.inv(LPS_FROM_RAS @ image.affine), name


def _resample_onto(
    source: list[Dataset], labels: np.ndarray, vox_from_lps: np.ndarray, what: str
) -> np.ndarray:
    """Label frames (instance, row, column), sampled at every source pixel centre (nearest voxel)."""
    frames, outside = [], 0
    for header in source:
        index = np.rint(_voxel_coordinates(header, vox_from_lps)).astype(np.int64)
        inside = np.all((index >= 0) & (index < labels.shape), axis=-1)
        outside += int(inside.size - inside.sum())
        index[~inside] = 0
        frames.append(np.where(inside, labels[index[..., 0], index[..., 1], index[..., 2]], 0))
    if outside:
        total = sum(int(h.Rows) * int(h.Columns) for h in source)
        raise DicomSegError(
            f"{what}: {outside} of {total} source pixels ({100 * outside / total:.1f}%) lie outside the "
            "label volume; it was not made on this series (different geometry or frame of reference)"
        )
    return np.stack(frames)


def _voxel_coordinates(header: Dataset, vox_from_lps: np.ndarray) -> np.ndarray:
    """Continuous label-voxel coordinates (rows, columns, 3) of one instance's pixel centres.

    PixelSpacing is (between rows, between columns): a step along a row (next column) moves by
    the second value along the row direction, the first three values of ImageOrientationPatient.
    """
    orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
    between_rows, between_columns = (float(v) for v in header.PixelSpacing)
    linear = vox_from_lps[:3, :3]
    start = linear @ np.asarray(header.ImagePositionPatient, dtype=float) + vox_from_lps[:3, 3]
    column_step = linear @ (orientation[:3] * between_columns)
    row_step = linear @ (orientation[3:] * between_rows)
    rows = np.arange(int(header.Rows), dtype=float)[:, None, None]
    columns = np.arange(int(header.Columns), dtype=float)[None, :, None]
    return start + rows * row_step + columns * column_step


def _relabel(frames: np.ndarray, values: list[int]) -> np.ndarray:
    """Label values -> consecutive segment numbers 1..N, highdicom's label-map style input."""
    lookup = np.zeros(max(values) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    return lookup[frames]


def _describe(
    number: int, value: int, name: str, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """A generic anatomical-structure segment: the name is free text, not a coded organ. SegmentLabel
    (LO) holds at most 64 characters and no backslash, DICOM's value separator, which would split
    "left\\right" into two values; SegmentDescription (ST) keeps the name whole."""
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name.replace("\\", "/")[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Organ,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*PALETTE[(number - 1) % len(PALETTE)]),
    )
    description.SegmentDescription = f"{name} (label value {value})"
    return description
