"""The MONAI image reader the bundles load with: NIfTI files, DICOM series folders and 2D images
(PNG, TIFF, JPEG), one ``reader``.

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader
from monai.data.folder_layout import default_name_formatter
from monai.data.utils import orientation_ras_lps
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple

from pipeline.io.dicom import is_series_path, read_series, split_series_path
from pipeline.io.geometry import Grid, grid_mismatch
from pipeline.io.names import case_name, is_planar

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


class InputReader(ImageReader):
    """NIfTI through MONAI's NibabelReader (unchanged behaviour), DICOM series through ``read_series``,
    PNG, TIFF (8/16-bit, one page or a stack) and JPEG through SimpleITK, with the spacing a TIFF
    carries (1 elsewhere).

    Name it in a config as ``reader: pipeline.io.readers.InputReader``. Several paths for one key
    are stacked as channels, as MONAI's readers do; so are the components of a colour image, except
    that a grey image stored as RGB is one channel. Other files (``.npy``) are declined in ``read``
    so that LoadImage falls back to its default readers for them.
    """

    def __init__(self, **nibabel_kwargs) -> None:
        super().__init__()
        self.nibabel = NibabelReader(**nibabel_kwargs)

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = ensure_tuple(filename)
        return all(_is_nifti(name) or is_series_path(name) or is_planar(name) for name in names)

    def read(self, data: Sequence[str] | str, **kwargs) -> tuple[str, ...]:
        """Only the paths: the reading is done in ``get_data`` (see the module docstring)."""
        paths = tuple(str(path) for path in ensure_tuple(data))
        if not self.verify_suffix(paths):
            raise ValueError(f"{paths}: neither NIfTI, PNG, TIFF or JPEG files nor DICOM series folders")
        return paths

    def get_data(self, img: tuple[str, ...]) -> tuple[np.ndarray, dict]:
        if all(_is_nifti(path) for path in img):
            return self.nibabel.get_data(self.nibabel.read(img))
        images = [read_series(path) if is_series_path(path) else sitk.ReadImage(path) for path in img]
        affine = sitk_affine(images[0])
        first = Grid(images[0].GetSize(), affine)
        for path, image in zip(img[1:], images[1:], strict=True):
            problem = grid_mismatch(Grid(image.GetSize(), sitk_affine(image)), first)
            if problem:
                raise ValueError(
                    f"{path} is not on the voxel grid of {img[0]} ({problem}); cannot stack them as channels"
                )
        arrays = [channel for image in images for channel in channels(image)]
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0,
        }
        return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta


def channels(image: sitk.Image) -> list[np.ndarray]:
    """The image's arrays in MONAI's axis order (x, y[, z]): one, or one per colour component;
    equal components (a grey picture saved as RGB) are one channel."""
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        return [array.T]
    components = np.moveaxis(array, -1, 0)
    if len(components) == 4 and np.all(components[3] == components[3].flat[0]):  # an opaque alpha
        components = components[:3]
    if all(np.array_equal(components[0], other) for other in components[1:]):
        return [components[0].T]
    return [component.T for component in components]


CASE_SUFFIX = ".case"  # a stand-in extension: MONAI's FolderLayout drops the subject's last suffix


def base_name(image: str | Path) -> str:
    """A case's name from its own file or series alone: the file name without its image extension;
    a series ``<folder>[_<uid hash>]`` (a UID's dots are no extension, and ``folder#uid`` series of one
    folder must differ)."""
    if is_series_path(image):
        folder, uid = split_series_path(image)
        return folder.name + (f"_{hashlib.sha256(uid.encode()).hexdigest()[:8]}" if uid else "")
    name = case_name(PurePath(str(image)))
    if name == PurePath(str(image)).name:  # not an image suffix we know: MONAI's rule, one suffix
        stem, suffix = os.path.splitext(name)
        name = os.path.splitext(stem)[0] if suffix == ".gz" else stem
    return name


def name_clashes(images: Sequence[str | Path | Sequence[str | Path]]) -> tuple[list[str], list[str]]:
    """Each case's output name, unique within ``images``, and the problems that prevent it.

    The name is ``base_name`` when no other case has it (so most outputs keep their plain names);
    cases sharing one get the shortest parent path that tells them apart, joined by ``_``
    (``p1/imaging.nii.gz`` and ``p2/imaging.nii.gz``: ``p1_imaging`` and ``p2_imaging``). One input
    given twice, or names that still clash, are problems: one output would hold another case.
    A case of one file per channel is named by its first, as MONAI does.
    """
    images = [_first(image) for image in images]
    paths = [split_series_path(_lookup_key(image))[0] for image in images]  # links kept: names are the user's
    names = [base_name(image) for image in images]
    problems, inputs = [], {}
    for index, image in enumerate(images):
        key = (paths[index].resolve(), split_series_path(image)[1])  # two spellings or a link: one input
        if key in inputs:
            problems.append(f"{images[inputs[key]]} and {image} are the same input")
        inputs.setdefault(key, index)
    groups: dict[str, list[int]] = {}
    for index in inputs.values():  # regardless of case: macOS and Windows file systems ignore it
        groups.setdefault(names[index].lower(), []).append(index)
    for group in (g for g in groups.values() if len(g) > 1):
        parents = {i: paths[i].parent.parts[1:] for i in group}  # the root is no name
        for depth in range(1, max(len(p) for p in parents.values()) + 1):
            named = {i: "_".join((*parents[i][-depth:], names[i])) for i in group}
            if len(set(named.values())) == len(group):
                break
        else:  # no parent tells them apart (a.nii and a.nii.gz in one folder): the clash is reported
            continue
        for index, name in named.items():
            names[index] = name
    first: dict[str, int] = {}
    for index in inputs.values():
        name = names[index].lower()
        if name in first:
            clash = f"{images[first[name]]} and {images[index]}"
            problems.append(f"{clash} would both be written as {names[index]}: rename one")
        first.setdefault(name, index)
    return names, problems


def output_names(images: Sequence[str | Path | Sequence[str | Path]]) -> list[str]:
    """``name_clashes``'s names; its problems raise, before any work, naming the inputs."""
    names, problems = name_clashes(images)
    if problems:
        raise ValueError("inputs without an output name of their own: " + "; ".join(problems))
    return names


def _lookup_key(image: str | Path) -> str:
    """The same string for a data entry's path and the ``filename_or_obj`` LoadImage made of it."""
    return os.path.abspath(os.path.expanduser(str(image)))


def _first(image: str | Path | Sequence[str | Path]) -> str | Path:
    """The file MONAI names a multi-file (one file per channel) case by."""
    return image if isinstance(image, (str, Path)) else image[0]


def series_name_formatter(metadict: dict, saver: object) -> dict:
    """SaveImaged's ``output_name_formatter`` for one case on its own: ``base_name`` of its input.

    MONAI's default takes the subject's last dotted part for an extension and drops it, so a series
    folder named by its UID (``1.2.840.1.7``) or a ``folder#uid`` path would lose its last UID
    component and sibling series would overwrite each other's outputs.
    """
    names = default_name_formatter(metadict, saver)
    if metadict and metadict.get(ImageMetaKey.FILENAME_OR_OBJ):
        names["subject"] = base_name(names["subject"]) + CASE_SUFFIX
    return names


class OutputNameFormatter:
    """SaveImaged's ``output_name_formatter`` for a batch: each case gets its ``output_names`` name.

    Name it as ``$pipeline.io.readers.OutputNameFormatter(@data)``. An entry's ``case_name`` (set by
    ``cases_to_segment`` for the whole batch, of which a rerun may see a part) wins; entries without
    one are named together. A file not in ``cases`` gets ``series_name_formatter``'s name.
    """

    def __init__(self, cases: Sequence[Mapping]) -> None:
        names = [case.get("case_name") for case in cases]
        if None in names:
            names = output_names([case["image"] for case in cases])
        images = [_first(case["image"]) for case in cases]
        self.names = {_lookup_key(image): str(name) for image, name in zip(images, names, strict=True)}

    def __call__(self, metadict: dict, saver: object) -> dict:
        names = series_name_formatter(metadict, saver)
        source = (metadict or {}).get(ImageMetaKey.FILENAME_OR_OBJ)
        if source and _lookup_key(source) in self.names:
            names["subject"] = self.names[_lookup_key(source)] + CASE_SUFFIX
        return names
