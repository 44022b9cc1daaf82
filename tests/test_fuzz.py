"""Generated broken NIfTI files, DICOM series, datalists and labels fed to ``medseg check`` and ``infer``.

Every broken input must end in a clear error naming its file and what is wrong: no traceback, no
hang, no memory blow-up (headers declaring huge volumes are refused before any voxel is allocated);
every valid one, however unusual (paths outside the dataset folder, 300 classes), must pass. Most run
in this process through ``pipeline.cli.main``; the memory checks run as real ``medseg`` processes
under an address-space limit, with their own peak memory read from ``wait4``.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, tiny, write_dataset
from dicom_factory import write_series
from model_factory import untrained_model
from monai.transforms import LoadImage

from pipeline.cli import main
from pipeline.data.check import check_case, check_image
from pipeline.inference.batch import output_path
from pipeline.io.readers import InputReader

SHAPE = (16, 14, 12)
# Damage that leaves a usable image: a field nibabel ignores (the sform wins over the quaternion;
# bitpix follows datatype; a non-finite slope means "no scaling"), a blank-but-valid
# volume, or a DICOM field SimpleITK replaces with its default. Such inputs may pass; any other
# must be refused with an error naming the file, and random header flips may go either way.
MAY_PASS = {
    "bitpix_wrong.nii", "scl_slope_nan.nii", "scl_slope_inf.nii", "quatern_nan.nii",
    "qform_code_garbage.nii", "int64_extreme.nii.gz", "uint64_extreme.nii.gz", "tiny_spacing.nii.gz",
    "dicom_bits_wrong",
}  # fmt: skip
SINGULAR = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # two parallel axes
SEED = 20240611
FLIPS = 40  # headers with random bytes flipped
HEADER_FIELDS = {  # NIfTI-1 offsets: (offset, struct format) of fields worth breaking
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "qform_code": (252, "<h"),
    "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"), "magic": (344, "<4s"),
}  # fmt: skip


def image(shape: tuple[int, ...] = SHAPE, dtype: type = np.float32) -> np.ndarray:
    return (np.random.default_rng(0).normal(100, 20, size=shape)).astype(dtype)


def clean_bytes(data: np.ndarray | None = None, affine: np.ndarray = PHANTOM_AFFINE) -> bytes:
    return nib.Nifti1Image(image() if data is None else data, affine).to_bytes()


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def raw(content: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return make


def patched(field: str, *values: object) -> Callable[[Path], Path]:
    offset, fmt = HEADER_FIELDS[field]

    def make(path: Path) -> Path:
        content = bytearray(clean_bytes())
        content[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
        return write(path, bytes(content))

    return make


def saved(data: np.ndarray, affine: np.ndarray = PHANTOM_AFFINE) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        wide = data.dtype.kind in "iu" and data.dtype.itemsize == 8  # nibabel wants 64-bit ints explicit
        nib.save(nib.Nifti1Image(data, affine, dtype=data.dtype if wide else None), path)
        return path

    return make


def declared(
    shape: tuple[int, ...], dtype: type = np.float32, nifti2: bool = False
) -> Callable[[Path], Path]:
    """A header declaring ``shape``, followed by only a few bytes of data."""

    def make(path: Path) -> Path:
        header = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(dtype)
        with gzip.open(path, "wb") as stream:
            header.write_to(stream)
            stream.write(b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr + 64))
        return path

    return make


def cut(fraction: float, compressed: bool = True) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        content = gzip.compress(clean_bytes()) if compressed else clean_bytes()
        path.write_bytes(content[: int(len(content) * fraction)])
        return path

    return make


def flipped(index: int) -> Callable[[Path], Path]:
    """1 to 4 random bytes of the header fields that matter (``HEADER_FIELDS``) replaced by random values."""
    offsets = [o + i for o, fmt in HEADER_FIELDS.values() for i in range(struct.calcsize(fmt))]

    def make(path: Path) -> Path:
        rng = np.random.default_rng(SEED + index)
        content = bytearray(clean_bytes())
        for offset in rng.choice(offsets, size=rng.integers(1, 5), replace=False):
            content[offset] = int(rng.integers(0, 256))
        return write(path, bytes(content))

    return make


def nifti_corpus() -> dict[str, Callable[[Path], Path]]:
    filled = {"nan": np.nan, "inf": np.inf}
    makers: dict[str, Callable[[Path], Path]] = {
        "zero_bytes.nii.gz": raw(b""),
        "zero_bytes_plain.nii": raw(b""),  # not zero_bytes.nii: both would be written as zero_bytes
        "random_bytes.nii.gz": raw(np.random.default_rng(1).bytes(3000)),
        "text.nii": raw(b"not an image\n" * 40),
        "header_only.nii": cut(348 / len(clean_bytes()), compressed=False),
        "half_header.nii": cut(150 / len(clean_bytes()), compressed=False),
        "short_data.nii": cut(0.7, compressed=False),
        **{f"gzip_cut_{int(f * 100)}.nii.gz": cut(f) for f in (0.05, 0.3, 0.6, 0.95)},
        "bad_magic.nii": patched("magic", b"xy1\0"),
        "bad_sizeof_hdr.nii": patched("sizeof_hdr", 1234),
        "negative_dim.nii": patched("dim", 3, -16, 14, 12, 1, 1, 1, 1),
        "zero_dim.nii": patched("dim", 3, 0, 14, 12, 1, 1, 1, 1),
        "dim0_nine.nii": patched("dim", 9, 16, 14, 12, 1, 1, 1, 1),
        "datatype_unknown.nii": patched("datatype", 999),
        "bitpix_wrong.nii": patched("bitpix", 3),
        "vox_offset_past_end.nii": patched("vox_offset", 1.0e9),
        "vox_offset_negative.nii": patched("vox_offset", -400.0),
        "scl_slope_nan.nii": patched("scl_slope", float("nan")),
        "scl_slope_inf.nii": patched("scl_slope", float("inf")),
        "pixdim_huge.nii": patched("pixdim", 1.0, 1.0e30, 1.0e30, 1.0e30, 1.0, 1.0, 1.0, 1.0),
        "pixdim_negative.nii": patched("pixdim", 1.0, -2.0, -2.0, -2.0, 1.0, 1.0, 1.0, 1.0),
        "srow_nan.nii": patched("srow", *([float("nan")] * 12)),
        "srow_inf.nii": patched("srow", *([float("inf")] * 12)),
        "srow_zero.nii": patched("srow", *([0.0] * 12)),
        "quatern_nan.nii": patched("quatern", *([float("nan")] * 6)),
        "qform_code_garbage.nii": patched("qform_code", 77),
        "absurd_dims.nii.gz": declared((32767, 32767, 32767)),
        "absurd_dims_nifti2.nii.gz": declared((2**40, 2**40, 2**40), nifti2=True),
        "absurd_channels.nii.gz": declared((512, 512, 512, 4000)),
        "absurd_float64.nii.gz": declared((4000, 4000, 4000), np.float64),
        "declares_20gib.nii.gz": declared((1750, 1750, 1750)),  # a size a machine could hold
        "absurd_spacing.nii.gz": saved(image(), np.diag([1e6, 1e6, 1e6, 1.0])),
        "tiny_spacing.nii.gz": saved(image(), np.diag([1e-9, 1e-9, 1e-9, 1.0])),
        "singular_affine.nii.gz": saved(image(), SINGULAR),
        "complex64.nii.gz": saved(image().astype(np.complex64)),
        "rgb24.nii.gz": saved(np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
        "uint64_extreme.nii.gz": saved(np.full(SHAPE, np.iinfo(np.uint64).max, dtype=np.uint64)),
        "int64_extreme.nii.gz": saved(np.full(SHAPE, np.iinfo(np.int64).max, dtype=np.int64)),
        "complex128.nii.gz": saved(image().astype(np.complex128)),
        "nan_filled.nii.gz": saved(np.full(SHAPE, np.nan, np.float32)),
        "inf_filled.nii.gz": saved(np.full(SHAPE, np.inf, np.float32)),
        "one_voxel.nii.gz": saved(image((1, 1, 1))),
        "two_d.nii.gz": saved(image((16, 14))),
        "six_d.nii.gz": saved(image((4, 4, 4, 1, 2, 2))),
        **{f"{kind}_mixed.nii.gz": saved(np.where(image() > 100, value, 1.0).astype(np.float32))
           for kind, value in filled.items()},
    }  # fmt: skip
    makers.update({f"flipped_{index:02d}.nii": flipped(index) for index in range(FLIPS)})
    return makers


def series(change: Callable[[list[Path]], None]) -> Callable[[Path], Path]:
    """A clean 4-slice series whose files ``change`` then breaks."""

    def make(folder: Path) -> Path:
        change(write_series(folder, np.random.default_rng(0).integers(0, 500, (12, 10, 4)).astype(np.int16)))
        return folder

    return make


def edit(**tags: object) -> Callable[[list[Path]], None]:
    import pydicom

    def apply(files: list[Path]) -> None:
        for path in files:
            data = pydicom.dcmread(path)
            for tag, value in tags.items():
                if value is None:
                    delattr(data, tag)
                else:
                    setattr(data, tag, value)
            data.save_as(path)

    return apply


def on_file(index: int, change: Callable[[bytes], bytes]) -> Callable[[list[Path]], None]:
    def apply(files: list[Path]) -> None:
        files[index].write_bytes(change(files[index].read_bytes()))

    return apply


def dicom_corpus() -> dict[str, Callable[[Path], Path]]:
    return {
        "dicom_truncated_slice": series(on_file(1, lambda b: b[: len(b) // 2])),
        "dicom_zero_byte_slice": series(on_file(2, lambda b: b"")),
        "dicom_garbage_slice": series(on_file(0, lambda b: b[:132] + bytes(range(256)) * 4)),
        "dicom_missing_slice": series(lambda files: files[1].unlink()),
        "dicom_no_pixels": series(edit(PixelData=None)),
        "dicom_absurd_rows": series(edit(Rows=65535, Columns=65535)),
        "dicom_frames_huge": series(edit(NumberOfFrames=11_500_000)),  # 12x10x46e6 voxels: 20.6 GiB
        "dicom_nan_spacing": series(edit(PixelSpacing=["nan", "nan"])),
        "dicom_zero_spacing": series(edit(PixelSpacing=["0", "0"])),
        "dicom_no_position": series(edit(ImagePositionPatient=None)),
        "dicom_same_position": series(edit(ImagePositionPatient=["0", "0", "0"])),
        "dicom_bits_wrong": series(edit(BitsAllocated=12)),
        "dicom_no_orientation": series(edit(ImageOrientationPatient=None)),
        "dicom_parallel_orientation": series(edit(ImageOrientationPatient=["1", "0", "0", "1", "0", "0"])),
        "dicom_empty_folder": series(lambda files: [path.unlink() for path in files]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("bad")
    made = [maker(folder / name) for name, maker in nifti_corpus().items()]
    made += [maker(folder / name) for name, maker in dicom_corpus().items()]
    return made


def test_the_corpus_is_large(bad_inputs: list[Path]) -> None:
    assert len(bad_inputs) == len(nifti_corpus()) + len(dicom_corpus()) >= 100


def memory_limit(gib: float) -> Callable[[], None]:
    """For a child process: at most ``gib`` of address space, so allocating a declared volume fails."""

    def apply() -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def must_refuse(inputs: list[Path]) -> list[Path]:
    return [path for path in inputs if path.name not in MAY_PASS and not path.name.startswith("flipped_")]


def test_medseg_check_names_every_bad_file_without_a_traceback(
    bad_inputs: list[Path], phantom_datalist: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    content = json.loads(phantom_datalist.read_text())
    content["test"] = [{"image": str(path)} for path in bad_inputs]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({**content, "training": []}))
    status = main(["check", str(datalist), "--roles", "test"])
    out, err = capfd.readouterr()
    assert status == 1 and "Traceback" not in out + err
    named = {path for path in bad_inputs if f"error: {path}: " in out}
    assert [path for path in must_refuse(bad_inputs) if path not in named] == []
    assert f"{len(bad_inputs)} cases checked" in out


@pytest.fixture(scope="module")
def model(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model("unet3d", phantom_datalist, tmp_path_factory.mktemp("models"))


def infer_command(inputs: list[Path], out: Path, model: Path) -> list[str]:
    settings = [f"{key}={value}" for key, value in tiny("unet3d").items()]
    return ["infer", "unet3d", "--input", *map(str, inputs), "--output", str(out),
            "--checkpoint", str(model), "--tracking-optional", "--tracking-uri", f"sqlite:///{out}.db",
            *settings]  # fmt: skip


def test_medseg_infer_names_every_bad_file_without_a_traceback(
    bad_inputs: list[Path], model: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """The inputs that must be refused, in one run: each named (memory: ``test_huge_declared_...``)."""
    (empty,) = [path for path in bad_inputs if path.name == "dicom_empty_folder"]
    assert main(infer_command([empty], tmp_path / "out", model)) == 2, "no image at all: stops at once"
    assert f"medseg: error: input folder {empty} holds no" in capfd.readouterr().err
    refused = [path for path in must_refuse(bad_inputs) if path != empty]
    status = main(infer_command(refused, tmp_path / "out", model))
    err = capfd.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    report = err[err.index("medseg: error: ") :]
    assert f"{len(refused)} of {len(refused)} cases could not be segmented" in report
    assert [path for path in refused if f"\n  {path}: " not in report] == []


@pytest.mark.long
def test_medseg_infer_segments_or_names_every_input(
    bad_inputs: list[Path],
    model: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All of them in one run: the damage that leaves a usable image is segmented, the rest named."""
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    inputs = [path for path in bad_inputs if path.name != "dicom_empty_folder"]
    out = tmp_path / "out"
    status = main(infer_command(inputs, out, model))
    err = capfd.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    report = err[err.index("medseg: error: ") :]
    failed = {path for path in inputs if f"\n  {path}: " in report}
    segmented = {path for path in inputs if output_path(path, out, "seg").is_file()}
    assert failed.isdisjoint(segmented) and failed | segmented == set(inputs)
    assert set(must_refuse(inputs)) <= failed
    assert f"{len(failed)} of {len(inputs)} cases could not be segmented" in report


@pytest.mark.long
@pytest.mark.parametrize(
    "name", ["absurd_dims.nii.gz", "absurd_float64.nii.gz", "gzip_cut_60.nii.gz", "dicom_absurd_rows"]
)
def test_a_medseg_process_refuses_it_in_time_and_memory(
    name: str, bad_inputs: list[Path], model: Path, tmp_path: Path
) -> None:
    (path,) = [p for p in bad_inputs if p.name == name]
    for command in (["check-image"], infer_command([path], tmp_path / "out", model)):
        if command == ["check-image"]:
            datalist = tmp_path / "datalist.json"
            datalist.write_text(json.dumps({"labels": {"0": "background"}, "test": [{"image": str(path)}]}))
            command = ["check", str(datalist), "--roles", "test"]
        status, output, peak = measured(command, tmp_path)
        assert status == 1 and str(path) in output and "Traceback" not in output, output[-3000:]
        assert peak < 3 * 2**30, f"{command[0]} peaked at {peak / 2**30:.1f} GiB"


def measured(command: list[str], cwd: Path, gib: float = 6, timeout: float = 180) -> tuple[int, str, int]:
    """``medseg COMMAND`` in a fresh process under an address-space limit of ``gib``: its exit status,
    output, and its own peak resident memory in bytes. ``wait4`` reports that one child's peak;
    this process's ``ru_maxrss`` keeps the peak of everything run before, so it can show no growth."""
    log = cwd / f"medseg_{command[0]}.log"
    with log.open("w") as stream:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *command], cwd=cwd, stdout=stream,
            stderr=subprocess.STDOUT, preexec_fn=memory_limit(gib),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (reaped := os.wait4(child.pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                child.kill()
                child.wait()
                pytest.fail(
                    f"medseg {command[0]} still running after {timeout:g} s: {log.read_text()[-2000:]}"
                )
            time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(reaped[1])  # reaped here: Popen must not wait again
    return child.returncode, log.read_text(), reaped[2].ru_maxrss * 1024  # KiB on Linux


HUGE = [  # headers declaring 20 GiB (which this machine could hold) to 128 TiB of voxels
    "declares_20gib.nii.gz", "absurd_float64.nii.gz", "absurd_channels.nii.gz", "absurd_dims.nii.gz",
    "absurd_dims_nifti2.nii.gz", "dicom_frames_huge", "dicom_absurd_rows",
]  # fmt: skip


def test_huge_declared_volumes_are_refused_by_a_process_that_stays_small(
    bad_inputs: list[Path], tmp_path: Path
) -> None:
    """One ``medseg check`` process for all of them: each refused from its header, the peak far below
    the 20 GiB that reading the smallest would take (and the address-space limit makes that fail)."""
    huge = [path for path in bad_inputs if path.name in HUGE]
    assert len(huge) == len(HUGE)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({"labels": {"0": "background"}, "test": [{"image": str(p)} for p in huge]})
    )
    status, output, peak = measured(["check", str(datalist), "--roles", "test"], tmp_path)
    assert status == 1 and "Traceback" not in output, output[-3000:]
    lines = {
        path: [line for line in output.splitlines() if line.startswith(f"error: {path}: ")] for path in huge
    }
    assert {path.name: len(found) for path, found in lines.items()} == {name: 1 for name in HUGE}, output
    assert all("over the memory budget" in found[0] for found in lines.values()), output
    assert "declare 12x10x46000000 voxels (20.6 GiB as float32)" in output  # NumberOfFrames counted
    assert "1750x1750x1750 voxels (20 GiB as float32)" in output
    assert peak < 2 * 2**30, f"medseg check peaked at {peak / 2**30:.2f} GiB"


def nibabel_reads(path: Path) -> nib.Nifti1Image | None:
    """nibabel's own reading, header and voxels, or None: what the check is held to."""
    try:
        image = nib.load(path)
        np.asanyarray(image.dataobj)
    except Exception:  # any failure: the oracle only needs to know that nibabel cannot read it
        return None
    return image


REFUSALS = (  # what a damaged header may be refused for, as the check words it
    "cannot be read as NIfTI", "voxel data is truncated", "header is damaged", "voxel spacing", "affine ",
    "pixdim disagrees with the sform", "is not an image", "has ", "is 2D", "header declares",
    "voxels are of type",
)  # fmt: skip


def test_flipped_headers_are_refused_or_read_as_nibabel_reads_them(
    bad_inputs: list[Path], tmp_path: Path
) -> None:
    """A header with random bytes changed is refused, naming the file, or it is the image nibabel
    reads: the bundles' reader gives nibabel's shape and voxels (and affine, where pixdim agrees with
    it: else MONAI takes the qform), and a label on the clean grid is reported off the grid exactly
    when the image the reader gives moved (under 1e-5 is inside every tolerance; 1e-5 to 1e-3 is
    not judged)."""
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((image() > 100).astype(np.uint8), PHANTOM_AFFINE), label)
    load = LoadImage(reader=InputReader(), image_only=True)
    outcomes: dict[str, list[str]] = {"refused": [], "read": []}
    for path in (p for p in bad_inputs if p.name.startswith("flipped_")):
        findings = check_case({"image": str(path), "label": str(label)}, {0: "background", 1: "organ"}, 1)
        refused = [f for f in findings if f.path == str(path) and f.severity == "error"]
        read = nibabel_reads(path)
        assert read is not None or refused, f"{path.name}: nibabel cannot read it, yet the check passed it"
        if refused:  # unreadable, or readable with a header the check rejects (repaired, absurd spacing)
            assert all(f.problem.startswith(REFUSALS) for f in refused), refused
            outcomes["refused"].append(path.name)
            continue
        loaded = load(path)
        assert loaded.shape == read.shape and np.allclose(loaded.numpy(), np.asanyarray(read.dataobj)), (
            path.name
        )
        zooms = np.linalg.norm(read.affine[:3, :3], axis=0)
        if np.allclose(read.header.get_zooms()[:3], zooms):
            assert np.allclose(loaded.affine.numpy(), read.affine), path.name
        moved = np.abs(loaded.affine.numpy() - PHANTOM_AFFINE).max() if read.shape == SHAPE else np.inf
        off_grid = [
            f for f in findings if f.path == str(label) and ("grid" in f.problem or "shape" in f.problem)
        ]
        assert findings == off_grid, findings
        if moved < 1e-5 or moved > 1e-3:
            assert bool(off_grid) == (moved > 1e-3), (path.name, moved, findings)
        outcomes["read"].append(path.name)
    assert len(outcomes["refused"]) >= 10 and len(outcomes["read"]) >= 10, outcomes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-case dataset (case 0 in validation fold 0, case 1 for training) with one test case."""
    return write_dataset(tmp_path_factory.mktemp("fuzzed_datalists") / "dataset", num_cases=2, shape=SHAPE)


def replaced(content: dict, index: int = 0, **fields: object) -> dict:
    """``content`` with training case ``index``'s fields replaced; ``None`` removes one."""
    training = [dict(case) for case in content["training"]]
    training[index] = {
        key: value for key, value in {**training[index], **fields}.items() if value is not None
    }
    return {**content, "training": training}


Fuzzed = Callable[[dict, Path], tuple[object, str | None, str]]
# name -> content (a dict, or text), the file the error names (None: the datalist), words of the error
BROKEN_DATALISTS: dict[str, Fuzzed] = {
    "truncated_json": lambda c, root: (json.dumps(c)[:150], None, "is not valid JSON"),
    "not_an_object": lambda c, root: ("[1, 2]", None, "has no 'labels' table (index -> name)"),
    "labels_as_a_list": lambda c, root: (
        {**c, "labels": list(c["labels"].values())},
        None,
        "no 'labels' table",
    ),
    "modality_as_a_list": lambda c, root: ({**c, "modality": ["MRI"]}, None, "'modality' is not a table"),
    "training_as_an_object": lambda c, root: (
        {**c, "training": {"case": c["training"][0]}},
        None,
        "'training' is a dict, not a list of cases",
    ),
    "case_as_a_string": lambda c, root: (
        {**c, "training": ["imagesTr/case_000.nii.gz"]},
        None,
        'training case 0 is "imagesTr/case_000.nii.gz"',
    ),
    "image_as_a_number": lambda c, root: (
        replaced(c, image=42),
        None,
        "training case 0: image 42 is not a path",
    ),
    "label_as_a_list": lambda c, root: (
        replaced(c, label=["labelsTr/case_000.nii.gz"]),
        None,
        'label ["labelsTr/case_000.nii.gz"] is not a path',
    ),
    "fold_as_a_word": lambda c, root: (
        replaced(c, 1, fold="one"),
        None,
        'training case 1: fold "one" is not',
    ),
    "no_image_key": lambda c, root: (
        replaced(c, image=None),
        None,
        f"validation case of label {root}/labelsTr/case_000.nii.gz has no image",
    ),
    "no_label_key": lambda c, root: (
        replaced(c, 1, label=None),
        None,
        f"train case {root}/imagesTr/case_001.nii.gz has no label",
    ),
    "absent_image": lambda c, root: (
        replaced(c, image="imagesTr/gone.nii.gz"),
        f"{root}/imagesTr/gone.nii.gz",
        "does not exist",
    ),
    "path_escaping_to_nothing": lambda c, root: (
        replaced(c, 1, label="../../gone.nii.gz"),
        f"{root.parent.parent}/gone.nii.gz",
        "does not exist",
    ),
    "image_listed_twice": lambda c, root: (
        replaced(c, 1, image=c["training"][0]["image"]),
        None,
        "is listed 2 times (training)",
    ),
}


@pytest.mark.parametrize("name", BROKEN_DATALISTS)
def test_a_broken_datalist_is_one_error_naming_the_file_and_the_problem(
    name: str, dataset: Path, capfd: pytest.CaptureFixture
) -> None:
    content, named, words = BROKEN_DATALISTS[name](json.loads(dataset.read_text()), dataset.parent)
    datalist = dataset.parent / f"{name}.json"
    datalist.write_text(content if isinstance(content, str) else json.dumps(content))
    status = main(["check", str(datalist)])
    out, err = capfd.readouterr()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert status == 1 and "Traceback" not in out + err, out + err
    assert [line for line in errors if line.startswith(f"error: {named or datalist}: ") and words in line], (
        errors
    )


def test_unusual_but_valid_datalists_pass(dataset: Path, capfd: pytest.CaptureFixture) -> None:
    """Paths leading out of the dataset folder to real files, and a fold written as a string."""
    outside = dataset.parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    content = json.loads(dataset.read_text())
    for kind in ("image", "label"):
        shutil.copy(dataset.parent / content["training"][0][kind], outside / f"{kind}.nii.gz")
    escaping = replaced(content, image="../outside/image.nii.gz", label="../outside/label.nii.gz", fold="0")
    datalist = dataset.parent / "escaping.json"
    datalist.write_text(json.dumps(escaping))
    assert main(["check", str(datalist)]) == 0
    assert capfd.readouterr().out == "3 cases checked: 0 errors, 0 warnings\n"


def axis_flipped() -> np.ndarray:
    affine = PHANTOM_AFFINE.copy()
    affine[0, 0] *= -1  # an LPS/RAS mix-up on one axis: same spacing and origin, mirrored voxels
    return affine


SEG = (image() > 100).astype(np.uint8)
# name -> label voxels, label affine, words of the error on the label
BAD_LABELS = {
    "float_label": (SEG * np.float32(0.5), PHANTOM_AFFINE, "voxels are not integers (e.g. 0.5)"),
    "negative_label": (SEG.astype(np.int16) * -1, PHANTOM_AFFINE, "values [-1] are not declared classes"),
    "undeclared_label": (
        SEG * 9,
        PHANTOM_AFFINE,
        "values [9] are not declared classes (0 background, 1 organ",
    ),
    "label_of_another_shape": (SEG[:, :, :-1], PHANTOM_AFFINE, "shape 16x14x11 differs from 16x14x12 of "),
    "label_on_a_coarser_grid": (
        SEG,
        PHANTOM_AFFINE @ np.diag([2, 2, 2, 1]),
        "spacing 2.4x2.4x3 mm, not 1.2x1.2x1.5",
    ),
    "label_with_an_axis_flipped": (SEG, axis_flipped(), "not on the voxel grid of "),
    "label_with_two_channels": (
        np.stack([SEG, SEG], -1),
        PHANTOM_AFFINE,
        "a label has one channel, this one 2",
    ),
}


def labelled(folder: Path, seg: np.ndarray, affine: np.ndarray, classes: int = 3) -> tuple[Path, Path]:
    """A datalist of one labelled test case, with ``classes`` declared; returns it and the label's path."""
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image(), PHANTOM_AFFINE), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine, dtype=seg.dtype), folder / "label.nii.gz")
    names = {
        "0": "background",
        "1": "organ",
        "2": "core",
        **{str(i): f"class {i}" for i in range(3, classes)},
    }
    content = {"labels": names, "test": [{"image": "image.nii.gz", "label": "label.nii.gz"}]}
    (folder / "datalist.json").write_text(json.dumps(content))
    return folder / "datalist.json", folder / "label.nii.gz"


@pytest.mark.parametrize("name", BAD_LABELS)
def test_a_broken_label_is_an_error_naming_it(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    datalist, label = labelled(tmp_path, *BAD_LABELS[name][:2])
    status = main(["check", str(datalist), "--roles", "test"])
    out, err = capfd.readouterr()
    assert status == 1 and "Traceback" not in out + err, out + err
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors and all(line.startswith(f"error: {label}: ") for line in errors), out
    assert BAD_LABELS[name][2] in errors[0], out


def test_a_label_of_300_classes_passes(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Over 255 classes, declared and all present, stored as uint16 (as inference writes them)."""
    seg = (np.arange(np.prod(SHAPE)) % 300).reshape(SHAPE).astype(np.uint16)
    datalist, _ = labelled(tmp_path, seg, PHANTOM_AFFINE, classes=300)
    assert main(["check", str(datalist), "--roles", "test"]) == 0
    assert capfd.readouterr().out == "1 cases checked: 0 errors, 0 warnings\n"
    datalist.write_text(
        datalist.read_text().replace('"299": "class 299", ', "").replace(', "299": "class 299"', "")
    )
    assert main(["check", str(datalist), "--roles", "test"]) == 1
    assert "values [299] are not declared classes" in capfd.readouterr().out


def test_a_pixdim_that_disagrees_with_the_sform_is_refused(bad_inputs: list[Path]) -> None:
    """nibabel reads the sform (1.2 mm voxels); MONAI's reader, which training uses, takes the qform
    built from pixdim (1e30 mm): the check must judge the geometry training will see."""
    (path,) = [p for p in bad_inputs if p.name == "pixdim_huge.nii"]
    assert np.allclose(nib.load(path).affine, PHANTOM_AFFINE)
    assert [f.problem for f in check_image(path)] == [
        "pixdim disagrees with the sform: MONAI's reader (the bundles') gives 1e+30x1e+30x1e+30 mm voxels at "
        "30x25x-20, the sform 1.2x1.2x1.5 mm at 30x25x-20"
    ]
