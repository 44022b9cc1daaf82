"""Segmenting many cases in one run without losing work to one bad case, a kill or a full disk.

- Each segmentation is written atomically (``AtomicImageWriter``, named by SaveImaged's ``writer``):
  a killed run never leaves half a file under the final name. It is NIfTI, or PNG/TIFF for a batch of
  PNG/TIFF (or JPEG) images: the input's own format (``output_extension``).
- A rerun skips the cases whose segmentation exists (``cases_to_segment``; ``overwrite: true`` redoes
  them), so an interrupted batch resumes where it stopped; partial files of a killed run are removed.
- Each case's output name is unique within its batch (``case_name``): two ``imaging.nii.gz`` in
  different folders never write one file.
- A case that fails (reading, the network, post-processing or saving) is logged and skipped; the
  others go on, and the run ends listing every failure (``SkipFailedCases.raise_if_any`` raises
  ``CaseFailures``: ``medseg infer`` exits with status 1; a worker of ``--nproc`` also writes them to
  its ``failures_file``, ``pipeline.inference.parallel``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from ignite.engine import Engine, Events
from monai.data import FolderLayout, NibabelWriter

from pipeline.data.datalist import image_cases
from pipeline.io.atomic import TMP_SUFFIX, atomic_path, atomic_write, stale_temporaries
from pipeline.io.dicom import is_series_path
from pipeline.io.names import is_planar
from pipeline.io.readers import CASE_SUFFIX, output_names, series_name_formatter

logger = logging.getLogger(__name__)

OUTPUT_EXTENSION = ".nii.gz"  # SaveImaged's default, which the bundles keep for volumes
LOSSLESS = {".jpg": ".png", ".jpeg": ".png"}  # JPEG's compression would change class indices
STALE_AFTER_S = 600.0  # a partial file untouched this long has no writer any more


class AtomicImageWriter(NibabelWriter):
    """MONAI's NIfTI writer, writing beside the target and renaming into place when complete; a
    ``.png``/``.tif`` target is written by SimpleITK in the axis order the reader gave (the input's
    pixel grid, as ``pipeline.io.readers.InputReader`` read it)."""

    def write(self, filename: str | Path, verbose: bool = False, **kwargs: Any) -> None:
        with atomic_path(filename, keep_suffix=True) as tmp:
            if is_planar(filename):  # NibabelWriter casts in its own write: the class indices' dtype here
                pixels = np.asarray(self.data_obj).astype(self.output_dtype or np.uint8)
                sitk.WriteImage(sitk.GetImageFromArray(pixels.T), str(tmp))
            else:
                super().write(tmp, verbose=verbose, **kwargs)


def output_extension(images: Sequence[str | Path | Sequence[str | Path]]) -> str:
    """The segmentations' format: the inputs' own when all are 2D images of one format (JPEG: PNG),
    else NIfTI. One per batch, as SaveImaged takes one; a mixed batch gets NIfTI throughout."""
    suffixes = {_planar_suffix(image if isinstance(image, (str, Path)) else image[0]) for image in images}
    return suffixes.pop() if len(suffixes) == 1 and None not in suffixes else OUTPUT_EXTENSION


def _planar_suffix(image: str | Path) -> str | None:
    if not is_planar(image):
        return None
    suffix = Path(image).suffix.lower()
    return LOSSLESS.get(suffix, suffix)


def output_path(
    image: str | Path, output_dir: str | Path, postfix: str, name: str | None = None,
    extension: str = OUTPUT_EXTENSION,
) -> Path:  # fmt: skip
    """Where SaveImaged puts the segmentation of ``image``: the same formatter and folder layout.
    ``name`` is the case's name within its batch (``case_name``); without it, the input's own."""
    layout = FolderLayout(output_dir, postfix=postfix, extension=extension, makedirs=False)
    names = series_name_formatter({"filename_or_obj": str(image)}, None)
    if name is not None:
        names["subject"] = name + CASE_SUFFIX
    return Path(layout.filename(**names))


def dicom_seg_path(nifti: str | Path) -> Path:
    """The DICOM SEG written beside a segmentation of a series: ``<case>_seg.dcm``."""
    nifti = Path(nifti)
    return nifti.with_name(nifti.name.removesuffix(".gz").removesuffix(".nii") + ".dcm")


def label_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every class index (uint8 up to 256 classes, then uint16):
    a fixed uint8 would silently wrap class 256 to background."""
    return np.min_scalar_type(max(int(num_classes) - 1, 0)).type


def remove_stale_temporaries(outputs: Sequence[Path], older_than_s: float = STALE_AFTER_S) -> int:
    """Delete the partial files that killed writers left beside ``outputs``; returns how many.

    Only those untouched for ``older_than_s``: a running writer (another run into the same folder)
    keeps writing to its file, so its modification time stays recent.
    """
    by_folder: dict[Path, list[str]] = {}
    for path in outputs:
        by_folder.setdefault(path.parent, []).append(path.name)
    removed = 0
    for folder, names in by_folder.items():
        if not folder.is_dir() or not any(folder.glob(f".*{TMP_SUFFIX}*")):  # the usual case: none
            continue
        for tmp in (tmp for name in names for tmp in stale_temporaries(folder, name)):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run", removed)
    return removed


def cases_to_segment(
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    postfix: str,
    overwrite: bool = False,
    dicom_seg: bool = False,
    case_names: Sequence[str] | None = None,
) -> list[dict]:
    """The input cases (files, folders, DICOM series) still to segment, each with its ``case_name``.

    Names are unique within the batch (``pipeline.io.readers.output_names``); ``case_names`` gives
    them instead, when the batch is a part of a larger one (``medseg infer`` passes the cases still
    to do). Without ``overwrite``, cases whose segmentation (and, with ``dicom_seg``, a series' SEG)
    is already in ``output_dir`` are skipped: a rerun resumes a batch.
    """
    cases = image_cases(inputs if isinstance(inputs, (str, Path)) else list(inputs))
    names = list(case_names) if case_names else output_names([case["image"] for case in cases])
    if len(names) != len(cases):
        raise ValueError(f"{len(names)} case names for {len(cases)} inputs")
    for case, name in zip(cases, names, strict=True):
        case["case_name"] = name
    extension = output_extension([case["image"] for case in cases])
    outputs = [
        output_path(case["image"], output_dir, postfix, case["case_name"], extension) for case in cases
    ]
    remove_stale_temporaries([path for out in outputs for path in (out, dicom_seg_path(out))])
    if overwrite:
        return cases
    todo = [case for case, out in zip(cases, outputs, strict=True) if not _segmented(case, out, dicom_seg)]
    if len(todo) < len(cases):
        logger.info(
            "%d of %d cases already segmented in %s: skipped (overwrite=true segments them again)",
            len(cases) - len(todo),
            len(cases),
            output_dir,
        )
    return todo


def _segmented(case: dict, output: Path, dicom_seg: bool) -> bool:
    """Done: its segmentation exists, and its SEG when one is wanted (a series with ``dicom_seg``)."""
    wants_seg = dicom_seg and is_series_path(case["image"])
    return output.is_file() and (not wants_seg or dicom_seg_path(output).is_file())


@dataclass(frozen=True)
class Failure:
    case: str
    reason: str

    def __str__(self) -> str:
        return f"{self.case}: {self.reason}"


class CaseFailures(RuntimeError):
    """Some cases could not be segmented; the others were. ``failures`` names each with its reason."""

    def __init__(self, failures: Sequence[Failure], total: int) -> None:
        self.failures = list(failures)
        self.total = total
        lines = "\n".join(f"  {failure}" for failure in self.failures)
        super().__init__(f"{len(self.failures)} of {total} cases could not be segmented:\n{lines}")


def write_failures(path: str | Path, failures: Sequence[Failure]) -> None:
    """The failures as a JSON list, for the process that launched this one (``medseg infer --nproc``):
    written atomically, so a file there means the run reached its end."""
    with atomic_write(path) as handle:
        handle.write(json.dumps([asdict(failure) for failure in failures], indent=1).encode())


def read_failures(path: str | Path) -> list[Failure]:
    return [Failure(**item) for item in json.loads(Path(path).read_text())]


# A line "SomeError: message" of a traceback pasted into a message, and the wrappers to look through.
RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")
WRAPPERS = ("applying transform", "Caught ")


def reason(error: BaseException) -> str:
    """One line for a failure: the root cause, not MONAI's wrappers ("applying transform ...") nor the
    tracebacks that SaveImage and data loader workers paste into their own messages."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error)
    if "Traceback (most recent call last)" in text:
        raised = [
            m for line in text.splitlines() if (m := RAISED.match(line)) and not m[2].startswith(WRAPPERS)
        ]
        if raised:
            return f"{raised[-1][1].rsplit('.', 1)[-1]}: {raised[-1][2]}"
    first = text.strip().splitlines()[0] if text.strip() else "no detail"
    return f"{type(error).__name__}: {first}"


@dataclass
class _FailedLoad:
    """Stands in for a batch whose case could not be read."""

    case: str
    error: BaseException


class _FailSafeLoader:
    """Iterates a data loader, turning a case that cannot be loaded into a ``_FailedLoad``."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size ... as the loader's
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        for index in range(len(self.loader)):
            try:
                yield next(batches)
            except StopIteration:
                return
            except Exception as error:  # the reader's or a transform's: this case only
                yield _FailedLoad(_case_name(self.loader, index), error)


def _case_name(loader: Any, index: int) -> str:
    """The input of batch ``index`` (inference loads one case per batch, in order)."""
    data = getattr(getattr(loader, "dataset", None), "data", None)
    try:
        return str(data[index * loader.batch_size]["image"])
    except (TypeError, IndexError, KeyError):
        return f"case {index + 1}"


def _batch_case(batch: Any) -> str:
    try:
        return str(batch["image"].meta["filename_or_obj"][0])
    except (TypeError, KeyError, IndexError, AttributeError):
        return "a case"


class SkipFailedCases:
    """ignite handler for an inference engine: a failing case is logged and skipped, the others go on.

    It wraps the engine's data loader (a case that cannot be read) and its iteration (the network,
    post-processing, saving); a skipped case's iteration yields no output. Not for engines with
    metrics (evaluation): a skipped case would leave them misaligned, so ``enabled`` is off there.
    """

    def __init__(self, enabled: bool = True, failures_file: str | Path | None = None) -> None:
        self.enabled = enabled
        self.failures_file = failures_file
        self.failures: list[Failure] = []
        self.total = 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.data_loader = _FailSafeLoader(engine.data_loader)
        engine._process_function = self._tolerant(engine._process_function)  # ignite's iteration
        engine.add_event_handler(Events.STARTED, self._reset)

    def _reset(self, engine: Engine) -> None:
        self.failures.clear()
        self.total = engine.state.epoch_length or 0

    def _tolerant(self, iteration: Callable[[Engine, Any], Any]) -> Callable[[Engine, Any], Any]:
        def run_one(engine: Engine, batch: Any) -> Any:
            if isinstance(batch, _FailedLoad):
                return self._skip(batch.case, batch.error)
            try:
                return iteration(engine, batch)
            except Exception as error:
                return self._skip(_batch_case(batch), error)

        return run_one

    def _skip(self, case: str, error: BaseException) -> list:
        failure = Failure(case, reason(error))
        self.failures.append(failure)
        logger.error("skipping %s", failure)
        return []

    def raise_if_any(self) -> None:
        """At the end of the run (the workflow's ``finalize``): every failure, in one error, and in
        ``failures_file`` when given, even when empty (a worker of ``medseg infer --nproc`` reports so)."""
        if self.failures_file:
            write_failures(self.failures_file, self.failures)
        if self.failures:
            raise CaseFailures(self.failures, self.total)
