"""Check a datalist's files before any work: every problem of every case, in one report.

A broken case otherwise surfaces hours into training, as a crash in a data loader worker that
names no file, or never (a shifted label trains a worse model silently). Each file is read once, by
``pipeline.io.inspect``: its header first, its voxels only when the header is sound and small enough.

Rules (``error`` stops training and evaluation; ``warning`` is reported and logged only):

- missing, unreadable or truncated files, headers nibabel must repair: error.
- layout: 2D images (PNG, TIFF, JPEG, 2D NIfTI), 3D, or 4D/5D with channels last; single slices
  are errors, and the channel count must match the datalist's ``modality`` table (a label has one
  channel). A 2D label of a 3D image is refused as a grid mismatch.
- size guard: a volume whose voxel count x 4 bytes (its float32 tensor) exceeds the memory
  budget (default 8 GiB) is refused from its header, before any voxel is read.
- spacing, taken from the affine (what MONAI resamples with): NaN, zero (degenerate axes),
  under 1 micrometre (even micro-CT is coarser; usually metres) or over 20 mm (no 3D scan has it;
  usually cm/m units) is an error; anisotropy over 20x is a
  warning (thick-slice MRI reaches 15x legitimately).
- image vs label: one voxel grid (``pipeline.io.geometry.grid_mismatch``: the same shape, and the
  same spacing, origin and direction within 1e-4, far above float32 and DICOM decimal-string
  rounding, far below any real misregistration), as evaluation and the pictures check it.
- label values must be integers and declared classes; NaN or infinite image voxels are errors, and so
  are voxels that are not real scalars (RGB, complex).
- an all-background label is a warning: negative cases are legitimate (MONAI's crop samplers
  fall back to background), but a label that lost its foreground looks the same.
- an image with one value everywhere is a warning (a blank export).
- DICOM series go through ``pipeline.io.dicom.read_series``, the reader the bundles use; its
  errors (several series, a missing slice, a damaged file) become findings. The size guard is for
  NIfTI headers, which can declare any size; a series' slices are all on disk.
- datalist: an empty role is an error (a warning for ``test`` in ``medseg check``: MSD datalists
  may omit it); an image listed twice, or a training case without a label, is an error, and so
  are two cases whose predictions would get one name (``a.nii`` and ``a.nii.gz`` in one folder).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.datalist import cases, label_names, label_values, num_channels, pixel_classes, read_json
from pipeline.io.geometry import Grid, grid_mismatch, same_grid, shape_mismatch
from pipeline.io.inspect import Unreadable, open_volume, reason
from pipeline.io.readers import name_clashes

Severity = Literal["error", "warning"]
MEMORY_BUDGET = 8 * 2**30
MAX_SPACING_MM = 20.0
MIN_SPACING_MM = 1e-3
MAX_ANISOTROPY = 20.0
REPORT_LINES = 20
DEFAULT_ROLES = ("train", "validation", "test")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem of one file; ``str`` gives the line a report shows."""

    path: str
    problem: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def report(findings: Sequence[Finding], limit: int = REPORT_LINES) -> str:
    """Errors before warnings, so a long report still shows what must be fixed first."""
    ordered = sorted(findings, key=lambda f: f.severity != "error")
    lines = [f"{f.severity}: {f}" for f in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"and {len(ordered) - limit} more")
    return "\n".join(lines)


class DataCheckError(ValueError):
    """Raised by ``require_valid``; ``findings`` holds every finding, the message the first lines."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        errors = sum(f.severity == "error" for f in self.findings)
        super().__init__(f"data check found {errors} errors:\n{report(self.findings)}")


@dataclass
class Volume:
    """What the pair checks need of a file, so that its voxels can be dropped once it is checked."""

    path: str
    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray | None  # None when the geometry itself is broken: nothing to compare


def _xs(values: Sequence[float]) -> str:
    """``12x10x8`` for shapes, ``0.8x0.8x2.5`` for spacings."""
    return "x".join(str(v) if isinstance(v, (int, np.integer)) else f"{v:.4g}" for v in values)


def _geometry(path: str, affine: np.ndarray) -> list[Finding]:
    """Spacing from the affine's columns: resampling uses the affine, not the header's pixdim."""
    if not np.isfinite(affine).all():
        return [Finding(path, "affine holds NaN or infinite values; the voxel spacing is unknown")]
    axes = affine.shape[0] - 1  # 3, or 2 for a 2D image
    spacing = np.linalg.norm(affine[:axes, :axes], axis=0)
    if (spacing <= 0).any():
        return [Finding(path, f"voxel spacing {_xs(spacing)} mm has a zero axis (degenerate affine)")]
    findings = []
    if abs(np.linalg.det(affine[:axes, :axes] / spacing)) < 1e-2:
        findings.append(Finding(path, "affine axes are (nearly) parallel: the direction matrix is singular"))
    if spacing.min() < MIN_SPACING_MM:
        problem = f"voxel spacing {_xs(spacing)} mm is under {MIN_SPACING_MM:g} mm (wrong units?)"
        findings.append(Finding(path, problem))
    if spacing.max() > MAX_SPACING_MM:
        problem = f"voxel spacing {_xs(spacing)} mm is over {MAX_SPACING_MM:g} mm (wrong units?)"
        findings.append(Finding(path, problem))
    if spacing.max() / spacing.min() > MAX_ANISOTROPY:
        problem = f"voxel spacing {_xs(spacing)} mm is more than {MAX_ANISOTROPY:g}x anisotropic"
        findings.append(Finding(path, problem, "warning"))
    return findings


def _volume(path: str, shape: Sequence[int], channels: int, affine: np.ndarray, findings: list) -> Volume:
    """The file's geometry, checked (findings go to ``findings``); a broken one is not compared."""
    geometry = _geometry(path, affine)
    findings += geometry
    broken = any(f.severity == "error" for f in geometry)
    return Volume(path, tuple(int(s) for s in shape), int(channels), None if broken else affine)


def _reader_geometry(path: str, affine: np.ndarray | None, loaded: np.ndarray | None) -> list[Finding]:
    """Training must see the geometry checked: MONAI's reader replaces an sform that pixdim disagrees with."""
    if affine is None or loaded is None or same_grid(Grid((), loaded), Grid((), affine)):  # one file's shape
        return []
    spacing, loaded_spacing = (_xs(np.linalg.norm(a[:3, :3], axis=0)) for a in (affine, loaded))
    origin, loaded_origin = _xs(affine[:3, 3]), _xs(loaded[:3, 3])
    reader = f"MONAI's reader (the bundles') gives {loaded_spacing} mm voxels at {loaded_origin}"
    return [Finding(path, f"pixdim disagrees with the sform: {reader}, the sform {spacing} mm at {origin}")]


def _read(path: str, budget: int) -> tuple[Volume | None, np.ndarray | None, list[Finding]]:
    """Header first; voxels only when the layout is usable and fits the budget."""
    try:
        opened = open_volume(path, budget)
    except Unreadable as error:
        return None, None, [Finding(path, str(error))]
    findings = [Finding(path, f"header is damaged; nibabel repaired it: {r}") for r in opened.repairs]
    if opened.refused:
        return None, None, [*findings, Finding(path, opened.refused)]
    volume = _volume(path, opened.shape, opened.channels, opened.affine, findings)
    findings += _reader_geometry(path, volume.affine, opened.reader_affine)
    try:
        return volume, opened.voxels(), findings
    except Unreadable as error:
        return volume, None, [*findings, Finding(path, str(error))]


def _image_values(path: str, data: np.ndarray) -> list[Finding]:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        counts = {"NaN": int(np.isnan(data).sum()), "infinite": int(np.isinf(data).sum())}
        return [Finding(path, f"{n} {kind} voxels") for kind, n in counts.items() if n]
    if data.size and data.min() == data.max():
        return [Finding(path, f"every voxel has the same value ({data.flat[0]:g})", "warning")]
    return []


def _values(data: np.ndarray) -> list[int]:
    """The distinct (integer) values; one comparison per value when few, 6x faster than np.unique."""
    if data.size == 0:
        return []
    low, high = int(data.min()), int(data.max())
    if high - low < 256:
        return [v for v in range(low, high + 1) if (data == v).any()]
    return [int(v) for v in np.unique(data)]


def _label_values(path: str, data: np.ndarray, labels: Mapping[int, str]) -> list[Finding]:
    """A label holds class indices: integers the datalist declares."""
    findings = []
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            findings.append(Finding(path, f"{int((~finite).sum())} NaN or infinite voxels"))
            data = data[finite]
        fractional = data != np.round(data)
        if fractional.any():
            example = float(data[fractional].flat[0])
            problem = f"{int(fractional.sum())} voxels are not integers (e.g. {example:g}): interpolated?"
            findings.append(Finding(path, problem))
            data = np.round(data)
    values = _values(data)
    undeclared = [v for v in values if v not in labels]
    if undeclared:
        more = f" and {len(undeclared) - 10} more" if len(undeclared) > 10 else ""
        declared = ", ".join(f"{i} {name}" for i, name in sorted(labels.items())[:8])
        declared += f", ... {max(labels)}" if len(labels) > 8 else ""
        findings.append(
            Finding(path, f"values {undeclared[:10]}{more} are not declared classes ({declared})")
        )
    if values == [0]:
        findings.append(Finding(path, "is empty: every voxel is background (0)", "warning"))
    return findings


def _check_file(
    path: str, budget: int, labels: Mapping[int, str] | None = None
) -> tuple[Volume | None, list[Finding]]:
    """Check one file; with ``labels`` it is a label. Its voxels are released on return."""
    volume, data, findings = _read(str(path), budget)
    if data is not None and data.dtype.kind not in "biuf":  # RGB or complex voxels: no intensity to use
        findings.append(
            Finding(path, f"voxels are of type {data.dtype}; a real-valued scalar image is needed")
        )
    elif data is not None:
        findings += _image_values(path, data) if labels is None else _label_values(path, data, labels)
    if volume and labels is not None and volume.channels != 1:
        findings.append(Finding(path, f"a label has one channel, this one {volume.channels}"))
    return volume, findings


def _channels(path: str, found: int, expected: int | None) -> list[Finding]:
    if expected is None or found == expected:
        return []
    return [Finding(path, f"has {found} channels; the datalist's modality table declares {expected}")]


def check_image(
    path: str | Path, *, expected_channels: int | None = None, memory_budget: int = MEMORY_BUDGET
) -> list[Finding]:
    """Everything that can be checked of an image alone; inference uses it to skip bad inputs."""
    volume, findings = _check_file(str(path), memory_budget)
    return findings + (_channels(str(path), volume.channels, expected_channels) if volume else [])


def _same_grid(volume: Volume, reference: Volume) -> list[Finding]:
    """``volume`` must lie on ``reference``'s voxel grid (only the shapes when an affine is broken:
    that affine has its own finding)."""
    other_shape = shape_mismatch(volume.shape, reference.shape)
    if other_shape:
        return [Finding(volume.path, f"{other_shape} of {reference.path}")]
    if volume.affine is None or reference.affine is None:
        return []
    problem = grid_mismatch(Grid(volume.shape, volume.affine), Grid(reference.shape, reference.affine))
    return [Finding(volume.path, f"not on the voxel grid of {reference.path}: {problem}")] if problem else []


def check_case(
    case: Mapping,
    labels: Mapping[int, str],
    expected_channels: int | None,
    *,
    memory_budget: int = MEMORY_BUDGET,
) -> list[Finding]:
    """A case's image file(s), its label if any, and whether they all share one voxel grid."""
    return _checked_case(case, labels, expected_channels, memory_budget)[1]


def _checked_case(
    case: Mapping, labels: Mapping[int, str], expected_channels: int | None, memory_budget: int
) -> tuple[Volume | None, list[Finding]]:
    """The case's first image (None when unreadable) and the case's findings."""
    paths = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
    findings, volumes = [], []
    for path in map(str, paths):
        volume, found = _check_file(path, memory_budget)
        findings += found
        volumes.append(volume)
    if all(volumes):
        findings += _channels(str(paths[0]), sum(v.channels for v in volumes), expected_channels)
    if case.get("label"):
        label, found = _check_file(str(case["label"]), memory_budget, labels)
        findings += found
        volumes.append(label)
    present = [v for v in volumes if v]
    return volumes[0], findings + [f for v in present[1:] for f in _same_grid(v, present[0])]


def _mixed_dimensions(images: Sequence[Volume]) -> list[Finding]:
    """One network takes 2D images or 3D volumes, not both: the cases of the rarer dimension are
    named (a 2D slice exported among volumes, a volume among PNGs)."""
    by_dims: dict[int, list[str]] = {}
    for volume in images:
        by_dims.setdefault(len(volume.shape), []).append(volume.path)
    if len(by_dims) < 2:
        return []
    usual = max(by_dims, key=lambda dims: len(by_dims[dims]))
    problem = f"is {{}}D while {len(by_dims[usual])} of the datalist's {len(images)} images are {usual}D"
    return [
        Finding(path, problem.format(dims))
        for dims, paths in by_dims.items()
        if dims != usual
        for path in paths
    ]


def _case_key(case: Mapping) -> str:
    image = case.get("image")
    return " + ".join(map(str, image)) if isinstance(image, (list, tuple)) else str(image)


def _list_problems(datalist: Path, dataset_dir: Path | None, by_role: dict[str, list[dict]]) -> list[Finding]:
    """Cases without an image or a label, and duplicates: the same image twice skews the folds,
    and in both training and test it inflates the scores."""
    findings, lists = [], {}
    for role, found in by_role.items():
        for case in found:  # a case without an image is named by its label
            if not case.get("image"):
                problem = f"{role} case of label {case.get('label')} has no image"
                findings.append(Finding(str(datalist), problem))
            elif role != "test" and not case.get("label"):
                findings.append(Finding(str(datalist), f"{role} case {_case_key(case)} has no label"))
    for name, role in (("training", "all"), ("test", "test")):
        for case in cases(datalist, dataset_dir, role=role):
            lists.setdefault(_case_key(case), []).append(name)
    twice = {key: names for key, names in lists.items() if len(names) > 1}
    listed = "is listed {} times ({})"
    return findings + [
        Finding(str(datalist), f"{key} {listed.format(len(names), ' and '.join(sorted(set(names))))}")
        for key, names in twice.items()
    ]


def _name_clashes(datalist: Path, found: Iterable[Mapping]) -> list[Finding]:
    """Cases whose predictions would be one file (``pipeline.io.readers.output_names``, the names
    that evaluation and ``medseg evaluate --predictions`` use): one case would be scored as the other."""
    return [Finding(str(datalist), problem) for problem in name_clashes([case["image"] for case in found])[1]]


def _check(
    datalist: Path,
    dataset_dir: Path | None,
    roles: Sequence[str],
    val_fold: int,
    optional: Collection[str],
    budget: int,
) -> tuple[int, list[Finding]]:
    """Number of cases checked and the findings; each case once, whatever roles it is in."""
    try:
        content = read_json(datalist)
        labels = {int(index): str(name) for index, name in content["labels"].items()}
        by_role = {role: cases(datalist, dataset_dir, role=role, val_fold=val_fold) for role in roles}
        findings = _list_problems(datalist, dataset_dir, by_role)
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError) as error:
        return 0, [Finding(str(datalist), f"cannot be used as a datalist ({reason(error)})")]
    try:
        label_names(datalist)  # for its check that the indices are 0..N-1, as one-hot encoding needs
    except ValueError as error:
        findings.append(Finding(str(datalist), str(error)))
    for role, found in by_role.items():
        if not found:
            severity: Severity = "warning" if role in optional else "error"
            findings.append(Finding(str(datalist), f"has no {role} cases (val_fold={val_fold})", severity))
    unique = {_case_key(case): case for found in by_role.values() for case in found if case.get("image")}
    findings += _name_clashes(datalist, unique.values())
    try:
        values = pixel_classes(labels, label_values(datalist))
    except (ValueError, KeyError) as error:
        return len(unique), [*findings, Finding(str(datalist), f"label_values: {reason(error)}")]
    images = []
    for case in unique.values():
        image, found = _checked_case(case, values, num_channels(datalist), budget)
        findings += found
        images += [image] if image else []
    return len(unique), findings + _mixed_dimensions(images)


def checked_cases(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    roles: Sequence[str] = DEFAULT_ROLES,
    *,
    val_fold: int = 0,
    optional_roles: Collection[str] = ("test",),
    memory_budget: int = MEMORY_BUDGET,
) -> tuple[int, list[Finding]]:
    """How many distinct cases were checked, and every finding: a report's summary line needs both."""
    dataset_dir = Path(dataset_dir) if dataset_dir else None
    return _check(Path(datalist), dataset_dir, roles, val_fold, optional_roles, memory_budget)


def check_datalist(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    roles: Sequence[str] = DEFAULT_ROLES,
    *,
    val_fold: int = 0,
    optional_roles: Collection[str] = ("test",),
    memory_budget: int = MEMORY_BUDGET,
) -> list[Finding]:
    """Every finding of every case of ``roles``; an empty role in ``optional_roles`` is only a warning."""
    options = {"val_fold": val_fold, "optional_roles": optional_roles, "memory_budget": memory_budget}
    return checked_cases(datalist, dataset_dir, roles, **options)[1]


def require_valid(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    roles: Sequence[str] = ("train", "validation"),
    *,
    val_fold: int = 0,
    memory_budget: int = MEMORY_BUDGET,
) -> None:
    """Fail before any work when a role the run needs is empty or any of its files has an error."""
    findings = check_datalist(
        datalist, dataset_dir, roles, val_fold=val_fold, optional_roles=(), memory_budget=memory_budget
    )
    for finding in findings:
        if finding.severity == "warning":
            log.warning("%s", finding)
    if any(f.severity == "error" for f in findings):
        raise DataCheckError(findings)
