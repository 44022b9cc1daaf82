"""Open a NIfTI file, a DICOM series or a 2D image for the data check: its header first, its voxels
on request.

Why a module of its own: ``pipeline.data.check`` must judge a file from its header before any
voxel is read (a NIfTI header can declare any size), must see the header fields nibabel repairs
silently, and must turn every reader error into one line of its report instead of a crash. The
loaders in ``readers.py`` do none of that, and ``pipeline/io`` is the only code that touches file
formats: so the reading is here, and the rules that judge what was read stay in ``check.py``.

A NIfTI file's voxels are refused, before any is read, when its shape is not a volume in MSD's
channels-last layout, or when their float32 tensor would exceed the caller's memory budget.

DICOM series go through ``dicom.read_series``, the reader the bundles use, so its errors (several
series, a missing slice, a damaged file) are the ones training would meet. A series is read
whole: its slices are all on disk, so no header can promise more voxels than there are.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data.utils import correct_nifti_header_if_necessary
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.io.dicom import is_series_path, read_series
from pipeline.io.names import is_planar
from pipeline.io.readers import channels as image_channels
from pipeline.io.readers import sitk_affine

# What nibabel raises for a damaged file: bad gzip (OSError, EOFError, zlib.error), no NIfTI magic
# (ImageFileError), nonsense header fields (HeaderDataError, ValueError), short data (OSError).
READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ValueError)


class Unreadable(Exception):
    """A file, or its voxels, that cannot be read; the message says why, in one line."""


@dataclass
class Opened:
    """A file with its header read; ``voxels()`` reads the voxels (``Unreadable`` if it cannot)."""

    shape: tuple[int, ...]  # spatial (x, y, z); as stored when ``refused``
    channels: int
    affine: np.ndarray
    voxels: Callable[[], np.ndarray]
    repairs: list[str] = field(default_factory=list)  # what nibabel changed in a broken header
    refused: str | None = None  # why the voxels are not to be read: no volume, or too large
    reader_affine: np.ndarray | None = None  # the affine the bundles' reader gives, where it differs


def reason(error: BaseException) -> str:
    """``Type: first line of the message``, for a one-line report."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"


def _xs(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _size(num_bytes: int) -> str:
    power = min(int(math.log(max(num_bytes, 1), 1024)), 5)
    return f"{num_bytes / 1024**power:.3g} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')[power]}"


def _layout(shape: Sequence[int]) -> tuple[tuple[int, ...], int] | str:
    """Spatial shape and channel count of MSD's channels-last layout (a 2D image: x, y), or why the
    shape is not one."""
    if len(shape) < 2:
        return f"is {len(shape)}D ({_xs(shape)}); a 2D image or a 3D volume is needed"
    if len(shape) in (2, 3):
        spatial, channels = tuple(shape), 1
    elif len(shape) == 4:
        spatial, channels = tuple(shape[:3]), shape[3]
    elif len(shape) == 5 and shape[3] == 1:  # ITK's vector images: x, y, z, t=1, components
        spatial, channels = tuple(shape[:3]), shape[4]
    else:
        return f"has {len(shape)} dimensions ({_xs(shape)}); expected 3D, or 4D with channels last"
    if min(spatial) < 2:
        return f"is not an image ({_xs(shape)}): fewer than 2 voxels along an axis"
    return spatial, channels


def _size_guard(shape: Sequence[int], budget: int) -> str | None:
    needed = math.prod(int(s) for s in shape) * 4  # Python ints: no overflow for absurd headers
    if needed <= budget:
        return None
    problem = f"header declares {_xs(shape)} voxels ({_size(needed)} as float32), over the memory budget"
    return f"{problem} of {_size(budget)}; not read"


@contextmanager
def _header_repairs() -> Iterator[list[logging.LogRecord]]:
    """nibabel silently repairs some broken header fields (zero or negative pixdim, invalid codes)
    and only logs it; such a header holds values a tool invented, so collect the messages."""
    logger, collector = nib.imageglobals.logger, logging.handlers.BufferingHandler(capacity=10_000)
    collector.setLevel(logging.WARNING)  # nibabel's level for problems worth a fix, not notes
    saved, logger.handlers = logger.handlers, [collector]
    try:
        yield collector.buffer
    finally:
        logger.handlers = saved


def _nifti_voxels(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)
    except READ_ERRORS as error:
        raise Unreadable(f"voxel data is truncated or corrupt ({reason(error)})") from error


def _open_nifti(path: str, budget: int) -> Opened:
    """The header only: nibabel reads the voxels when ``voxels()`` asks for them."""
    try:
        with _header_repairs() as repairs:
            image = nib.load(path)
    except READ_ERRORS as error:
        raise Unreadable(f"cannot be read as NIfTI ({reason(error)})") from error
    messages = [record.getMessage() for record in repairs]
    layout = _layout(image.shape)
    refused = layout if isinstance(layout, str) else _size_guard(image.shape, budget)
    shape, channels = (image.shape, 1) if refused else layout
    affine = image.affine.copy()
    # MONAI's NibabelReader (the bundles' reader) takes the qform where pixdim disagrees with the sform:
    # a pixdim of 1e30 beside a sound sform is 1e30 mm voxels in training. (It edits ``image``.)
    loaded = None if refused else correct_nifti_header_if_necessary(image).affine
    return Opened(shape, channels, affine, lambda: _nifti_voxels(image), messages, refused, loaded)


def _open_series(path: str) -> Opened:
    """A series folder (or ``folder#uid``), read whole by the reader the bundles use."""
    try:
        image = read_series(path)
    except (ValueError, OSError, RuntimeError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines())
        raise Unreadable(f"DICOM series cannot be read: {message}") from error
    channels = image.GetNumberOfComponentsPerPixel()
    return Opened(image.GetSize(), channels, sitk_affine(image), lambda: sitk.GetArrayFromImage(image))


def open_volume(path: str, budget: int) -> Opened:
    """A DICOM series for a folder or ``folder#uid``, else a NIfTI file; ``Unreadable`` says why not.

    ``budget`` (bytes) caps a NIfTI file's float32 tensor; a series' slices are all on disk.
    """
    if Path(path).is_dir() or is_series_path(path):
        return _open_series(path)
    if not Path(path).is_file():
        raise Unreadable("does not exist")
    return _open_planar(path, budget) if is_planar(path) else _open_nifti(path, budget)


def _open_planar(path: str, budget: int) -> Opened:
    """A PNG, TIFF or JPEG file through SimpleITK, as the bundles' reader opens it (a grey image
    stored as RGB is one channel)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise Unreadable(f"cannot be read as an image ({reason(error)})") from error
    size, affine = tuple(reader.GetSize()), sitk_affine(reader)  # the reader has the image's geometry
    layout = _layout(size)
    refused = layout if isinstance(layout, str) else _size_guard(size, budget)
    if refused:
        return Opened(size, 1, affine, lambda: np.zeros(0), refused=refused)
    try:
        arrays = image_channels(reader.Execute())
    except RuntimeError as error:
        raise Unreadable(f"pixel data cannot be read ({reason(error)})") from error
    voxels = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    return Opened(size, len(arrays), affine, lambda: voxels)


def spatial_dims(path: str | Path) -> int:
    """2 or 3: the dimension of an image's grid from its header (a DICOM series is a volume)."""
    path = str(path)
    if Path(path).is_dir() or is_series_path(path):
        return 3
    opened = _open_planar(path, 0) if is_planar(path) else _open_nifti(path, 0)  # budget 0: no voxels
    layout = _layout(opened.shape)
    return len(layout[0]) if not isinstance(layout, str) else len(opened.shape)
