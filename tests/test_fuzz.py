"""Generated broken NIfTI files and DICOM series fed to ``medseg check`` and ``medseg infer``.

Every input must end in a clear error naming its file: no traceback, no hang, no memory blow-up
(headers declaring huge volumes are refused before any voxel is allocated). Most run in this
process through ``pipeline.cli.main``; a few run as real ``medseg`` processes under a time limit
and an address-space limit, so a hang or an allocation of the declared size would fail them.
"""

from __future__ import annotations

import gzip
import json
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, tiny
from dicom_factory import write_series
from model_factory import untrained_model

from pipeline.cli import main
from pipeline.inference.batch import output_path

SHAPE = (16, 14, 12)
# Damage that leaves a usable image: a field nibabel ignores (the sform wins over pixdim and the
# quaternion; bitpix follows datatype; a non-finite slope means "no scaling"), a blank-but-valid
# volume, or a DICOM field SimpleITK replaces with its default. Such inputs may pass; any other
# must be refused with an error naming the file, and random header flips may go either way.
MAY_PASS = {
    "bitpix_wrong.nii", "scl_slope_nan.nii", "scl_slope_inf.nii", "pixdim_huge.nii", "quatern_nan.nii",
    "qform_code_garbage.nii", "int64_extreme.nii.gz", "uint64_extreme.nii.gz", "tiny_spacing.nii.gz",
    "dicom_nan_spacing", "dicom_zero_spacing", "dicom_bits_wrong",
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
        "zero_bytes.nii": raw(b""),
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
    """The inputs that must be refused, in one run: each named, none read beyond its header."""
    (empty,) = [path for path in bad_inputs if path.name == "dicom_empty_folder"]
    assert main(infer_command([empty], tmp_path / "out", model)) == 2, "no image at all: stops at once"
    assert f"medseg: error: input folder {empty} holds no" in capfd.readouterr().err
    refused = [path for path in must_refuse(bad_inputs) if path != empty]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = main(infer_command(refused, tmp_path / "out", model))
    err = capfd.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    report = err[err.index("medseg: error: ") :]
    assert f"{len(refused)} of {len(refused)} cases could not be segmented" in report
    assert [path for path in refused if f"\n  {path}: " not in report] == []
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024
    assert grown < 2**30, f"peak memory grew by {grown / 2**30:.1f} GiB"


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
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command], cwd=tmp_path, capture_output=True,
            text=True, timeout=180, preexec_fn=memory_limit(6),
        )  # fmt: skip
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert str(path) in result.stdout + result.stderr and "Traceback" not in result.stderr
