"""DICOM series in: a PACS export folder read as one volume with its true geometry, or converted to NIfTI.

A series path is a folder of slice files, or ``<folder>#<SeriesInstanceUID>`` to pick one series
from a folder holding several (a UID is digits and dots only, so ``#`` cannot be part of it).
Slices are ordered by ImagePositionPatient projected on the slice normal, never by file name or
InstanceNumber, and the spacing between slices comes from those positions, not SliceThickness.
A missing or duplicated slice, a mixed orientation or a tilted gantry is an error, not a volume
with a silently wrong geometry. SimpleITK (GDCM) decodes the pixels and applies RescaleSlope and
RescaleIntercept, so CT values are HU.

Patient identifiers never reach an error, a log line, a file name or a sidecar: messages name
files, folders, UIDs and geometry only, and sidecars are built from an explicit allow-list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue

from pipeline.io.atomic import atomic_path, atomic_write

logger = logging.getLogger(__name__)

SERIES_SEPARATOR = "#"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Gaps between slice positions may differ from the median by this fraction (DS rounding, jitter).
SPACING_TOLERANCE = 0.05
MAX_SERIES_BYTES = 8 * 2**30  # the data check's memory budget for NIfTI headers, for declared DICOM sizes
# Acquisition fields a sidecar may carry: none identifies a patient, an institution or a date.
# SeriesDescription is left out on purpose: it is free text that operators sometimes fill with names.
SIDECAR_FIELDS = (
    "Modality",
    "SeriesNumber",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "KVP",
    "SliceThickness",
    "ConvolutionKernel",
    "RepetitionTime",
    "EchoTime",
    "FlipAngle",
    "RescaleType",
)

Slices = list[tuple[Path, Dataset]]


class DicomReadError(ValueError):
    """A file that looks like DICOM but cannot be read; the message names the file."""


class SeriesGeometryError(ValueError):
    """Slices that do not form one regular volume (missing slice, mixed orientations, tilt)."""


class MultipleSeriesError(ValueError):
    """A folder holding several series where one was expected; lists them and how to pick one."""

    def __init__(self, folder: Path, groups: dict[str, Slices]) -> None:
        self.series_uids = sorted(groups)
        lines = [f"  {folder}{SERIES_SEPARATOR}{uid}  ({_describe(groups[uid])})" for uid in self.series_uids]
        super().__init__(
            f"{folder} holds {len(groups)} DICOM series; pick one as <folder>{SERIES_SEPARATOR}"
            f"<SeriesInstanceUID>:\n" + "\n".join(lines)
        )


def _describe(slices: Slices) -> str:
    header = slices[0][1]
    return f"{header.get('Modality', '?')}, series {header.get('SeriesNumber', '?')}, {len(slices)} files"


def is_dicom_file(path: str | Path) -> bool:
    """The DICM magic at byte 128: cheap (132 bytes read), so whole export folders can be scanned."""
    return Path(path).is_file() and is_dicom(path)


def split_series_path(path: str | Path) -> tuple[Path, str | None]:
    """``<folder>#<uid>`` -> (folder, uid); a path that exists as written is never split."""
    text = str(path)
    if SERIES_SEPARATOR not in text or Path(text).exists():
        return Path(text), None
    folder, _, uid = text.rpartition(SERIES_SEPARATOR)
    return Path(folder), uid


def is_series_path(path: str | Path) -> bool:
    """Whether ``path`` names a DICOM series (a folder with DICOM files, or ``folder#uid``)."""
    folder, uid = split_series_path(path)
    if not folder.is_dir():
        return False
    return uid is not None or any(is_dicom_file(item) for item in folder.iterdir())


def _header(path: Path) -> Dataset | None:
    """The header of a DICOM slice file; None for non-DICOM files and DICOMDIR indexes."""
    if not is_dicom_file(path):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types on damaged files; the name is what helps
        raise DicomReadError(f"{path}: unreadable DICOM header ({type(error).__name__})") from None
    if header.file_meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return None
    if "SeriesInstanceUID" not in header:
        raise DicomReadError(f"{path}: no SeriesInstanceUID (a truncated or damaged DICOM file?)")
    return header


def _headers(folder: Path, recursive: bool = False, unreadable: list[str] | None = None) -> dict[str, Slices]:
    """Headers grouped by series. With an ``unreadable`` list, a damaged file is noted there and the
    scan goes on (a tree of studies); without one, it raises (one series, where every file counts)."""
    paths = sorted(folder.rglob("*") if recursive else folder.iterdir())
    groups: dict[str, Slices] = {}
    for path in paths:
        try:
            header = _header(path)
        except DicomReadError as error:
            if unreadable is None:
                raise
            unreadable.append(str(error))
            continue
        if header is not None:
            groups.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    return groups


def find_series(folder: str | Path, recursive: bool = False) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> its files, from headers only; other files (.DS_Store, DICOMDIR) ignored."""
    return {uid: [path for path, _ in slices] for uid, slices in _headers(Path(folder), recursive).items()}


def _vectors(where: str, slices: Slices, name: str) -> np.ndarray:
    try:
        return np.array([[float(value) for value in header[name].value] for _, header in slices])
    except (KeyError, TypeError, ValueError):
        raise DicomReadError(f"{where}: a slice has no valid {name}; not an image series") from None


def _check_spacing(where: str, positions: np.ndarray, normal: np.ndarray) -> None:
    """Evenly spaced positions along the normal, or a message saying where the volume breaks."""
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    step = float(np.median(along))
    if step < 1e-3:
        message = "several slices share one position (duplicate files, or several acquisitions in one series)"
        raise SeriesGeometryError(f"{where}: {message}")
    uneven = np.flatnonzero(np.abs(along - step) > SPACING_TOLERANCE * step)
    if uneven.size:
        i = int(uneven[0])
        raise SeriesGeometryError(
            f"{where}: slices are not evenly spaced: a gap of {along[i]:.3f} mm between slices {i + 1} and "
            f"{i + 2} of {len(positions)} (sorted by position) where the others are {step:.3f} mm apart; "
            "is a slice missing?"
        )
    if np.linalg.norm(steps - np.outer(along, normal), axis=1).max() > SPACING_TOLERANCE * step:
        raise SeriesGeometryError(f"{where}: slice positions do not follow the slice normal (gantry tilt?)")


def _order(where: str, slices: Slices) -> list[Path]:
    """Files sorted along the slice normal, after checking that they form one regular volume."""
    orientations = _vectors(where, slices, "ImageOrientationPatient")
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        raise SeriesGeometryError(f"{where}: slices have different orientations (a localizer series?)")
    positions = _vectors(where, slices, "ImagePositionPatient")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    order = np.argsort(positions @ normal, kind="stable")
    if len(order) > 1:
        _check_spacing(where, positions[order], normal)
    return [slices[i][0] for i in order]


def _execute(where: str, files: list[Path]) -> sitk.Image:
    """SimpleITK's series reader; on failure, find the file it choked on so the error can name it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path in files])
    try:
        return reader.Execute()
    except RuntimeError:
        pass  # SimpleITK's message does not say which file; reading them one by one does
    for path in files:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            raise DicomReadError(f"{path}: pixel data unreadable (truncated file?)") from None
    raise DicomReadError(f"{where}: SimpleITK cannot read these slices as one volume") from None


def _frames(header: Dataset) -> int:
    """Frames in one file: a multi-frame file (enhanced CT/MR) holds a whole volume in one 'slice'."""
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise DicomReadError("NumberOfFrames is not a number") from None


def _check_size(where: str, slices: Slices) -> None:
    """Refuse from the headers a volume too large to hold: Rows, Columns and NumberOfFrames can declare
    any size, and SimpleITK allocates the declared volume before it finds the pixel data missing."""
    try:
        rows, columns = int(slices[0][1].Rows), int(slices[0][1].Columns)
        frames = sum(_frames(header) for _, header in slices)
    except (AttributeError, TypeError, ValueError):
        raise DicomReadError(
            f"{where}: a slice has no valid Rows/Columns/NumberOfFrames; not an image series"
        ) from None
    needed = rows * columns * frames * 4  # as float32 after rescaling
    if needed > MAX_SERIES_BYTES:
        raise DicomReadError(
            f"{where}: slices declare {columns}x{rows}x{frames} voxels ({needed / 2**30:.3g} GiB as "
            f"float32), over the memory budget of {MAX_SERIES_BYTES / 2**30:g} GiB; not read"
        )


def _check_pixel_spacing(where: str, slices: Slices) -> None:
    """SimpleITK reads a missing, zero or NaN PixelSpacing as 1 mm: a silently wrong volume."""
    for (path, _), values in zip(slices, _vectors(where, slices, "PixelSpacing"), strict=True):
        if len(values) != 2 or not (np.isfinite(values).all() and (values > 0).all()):
            raise SeriesGeometryError(f"{path}: PixelSpacing {values.tolist()} is not two positive mm")


def _read_slices(where: str, slices: Slices) -> sitk.Image:
    _check_size(where, slices)
    _check_pixel_spacing(where, slices)
    image = _execute(where, _order(where, slices))
    if image.GetDimension() != 3:
        raise SeriesGeometryError(f"{where}: a single 2D slice, not a volume")
    return image


def _select(path: str | Path) -> tuple[str, Slices]:
    """The one series a series path names, with a name for it in messages."""
    folder, uid = split_series_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM series folder {folder} does not exist")
    groups = _headers(folder)
    if not groups:
        raise ValueError(f"{folder} holds no DICOM files (for a tree of studies use `medseg dicom2nifti`)")
    if uid is None:
        if len(groups) > 1:
            raise MultipleSeriesError(folder, groups)
        return str(folder), next(iter(groups.values()))
    if uid not in groups:
        raise ValueError(f"{folder} holds no series {uid}; it holds {', '.join(sorted(groups))}")
    return f"{folder}{SERIES_SEPARATOR}{uid}", groups[uid]


def read_series(path: str | Path) -> sitk.Image:
    """One series as a SimpleITK image: HU values, LPS geometry from the slice positions."""
    return _read_slices(*_select(path))


def _json_value(value: object) -> object:
    if isinstance(value, (MultiValue, list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    return str(value)


def sidecar(header: Dataset, image: sitk.Image) -> dict:
    """Acquisition facts for a converted series, from the allow-list only (see SIDECAR_FIELDS)."""
    values = {name: header.get(name) for name in SIDECAR_FIELDS}
    fields = {name: _json_value(value) for name, value in values.items() if value not in (None, "")}
    return {
        **fields,
        "spacing_mm": list(image.GetSpacing()),
        "size": list(image.GetSize()),
        "rescaled": "RescaleSlope and RescaleIntercept are applied: the NIfTI holds the rescaled values",
    }


def series_stem(uid: str, header: Dataset) -> str:
    """``CT_S003_1a2b3c4d``: modality, SeriesNumber, a hash of the UID; nothing that names a patient."""
    modality = re.sub(r"[^A-Za-z0-9]", "", str(header.get("Modality", ""))) or "OT"
    number = header.get("SeriesNumber")
    number = int(number) if number not in (None, "") else 0
    return f"{modality}_S{number:03d}_{hashlib.sha256(uid.encode()).hexdigest()[:8]}"


def _compact(image: sitk.Image) -> sitk.Image:
    """int16 when the values fit: GDCM widens CT to int32 to make room for the intercept."""
    if image.GetPixelID() not in (sitk.sitkInt32, sitk.sitkUInt16, sitk.sitkUInt32):
        return image
    extrema = sitk.MinimumMaximumImageFilter()
    extrema.Execute(image)
    if extrema.GetMinimum() >= -32768 and extrema.GetMaximum() <= 32767:
        return sitk.Cast(image, sitk.sitkInt16)
    return image


class ConversionFailures(ValueError):
    """Files or series of a tree that could not be converted; the others were (``written``)."""

    def __init__(self, failures: list[str], written: list[Path]) -> None:
        self.failures, self.written = failures, written
        lines = "\n".join(f"  {failure}" for failure in failures)
        super().__init__(f"{len(failures)} DICOM file(s) or series could not be converted:\n{lines}")


def _convert(where: str, uid: str, slices: Slices, out_dir: Path, overwrite: bool) -> Path | None:
    """Write one series' NIfTI and sidecar, each atomically; None when its NIfTI exists and is kept."""
    stem = series_stem(uid, slices[0][1])
    target = out_dir / f"{stem}.nii.gz"
    if target.exists() and not overwrite:
        logger.warning("kept the existing %s (%s); --overwrite replaces it", target.name, _describe(slices))
        return None
    image = _compact(_read_slices(where, slices))
    with atomic_path(target, keep_suffix=True) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    with atomic_write(out_dir / f"{stem}.json") as handle:
        handle.write((json.dumps(sidecar(slices[0][1], image), indent=2) + "\n").encode())
    logger.info("wrote %s (%d slices)", target.name, len(slices))
    return target


def dicom_to_nifti(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Convert one series (a series path) or every series under a tree of studies to ``.nii.gz`` + JSON.

    In a tree, a series that is not one regular volume (a localizer, a report) is skipped with a
    warning; an unreadable file or series is reported and the others still convert, then
    ``ConversionFailures`` lists them all. A single series that fails raises. An existing output is
    kept (a rerun converts only what is missing) unless ``overwrite``.
    """
    folder, uid = split_series_path(src)
    unreadable: list[str] = []
    if uid is not None:
        groups = {uid: _select(src)[1]}
    elif folder.is_dir():
        groups = _headers(folder, recursive=True, unreadable=unreadable)
    else:
        raise FileNotFoundError(f"DICOM source {folder} does not exist")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, kept = [], 0
    for series_uid, slices in groups.items():
        where = f"{slices[0][0].parent}" + (f"{SERIES_SEPARATOR}{series_uid}" if len(groups) > 1 else "")
        try:
            target = _convert(where, series_uid, slices, out_dir, overwrite)
        except SeriesGeometryError as error:
            if len(groups) == 1 and not unreadable:
                raise
            logger.warning("skipped series (%s): %s", _describe(slices), error)
            continue
        except DicomReadError as error:
            if len(groups) == 1 and not unreadable:
                raise
            unreadable.append(str(error))
            continue
        written += [target] if target else []
        kept += target is None
    if unreadable:
        raise ConversionFailures(unreadable, written)
    if not written and not kept:
        raise ValueError(f"{folder}: no DICOM image series found to convert")
    return written
