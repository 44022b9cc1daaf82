"""DICOM series in: geometry checked against SimpleITK's own series reader, on synthetic and real series.

Synthetic series come from ``dicom_factory`` (shuffled file names, known affine, known patient
strings); the real ones from ``../shared/data`` (skipped when absent). No mocks: every test reads
and writes real files.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import IDENTIFIERS, expected_affine, write_series
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImaged, SaveImaged
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.cli import main
from pipeline.io.dicom import (
    SIDECAR_FIELDS,
    DicomReadError,
    MultipleSeriesError,
    SeriesGeometryError,
    dicom_to_nifti,
    find_series,
    is_dicom_file,
    is_series_path,
    read_series,
)
from pipeline.io.readers import series_name_formatter, sitk_affine

READER = "pipeline.io.readers.InputReader"  # what the bundles' LoadImaged names
SHAPE = (16, 12, 8)
LEAKS = [*IDENTIFIERS.values(), "Doe", "Jane", "12345"]


def rotation(degrees_x: float, degrees_y: float) -> np.ndarray:
    ax, ay = np.radians([degrees_x, degrees_y])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rx @ ry


OBLIQUE = rotation(20, 20)
GEOMETRIES = {
    "axial": {},
    "oblique": {
        "spacing": (0.7, 0.9, 3.0),
        "row_direction": OBLIQUE[:, 0],
        "column_direction": OBLIQUE[:, 1],
    },
    "coronal_rescaled": {
        "spacing": (1.0, 1.2, 2.0),
        "column_direction": (0, 0, -1),
        "slope": 0.5,
        "intercept": -1000.0,
    },
    "positions_decreasing": {"row_direction": (-1, 0, 0), "origin": (100, -120, 50)},
}


def stored_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 3000, SHAPE).astype(np.int16)


def affine_of(kwargs: dict, ras: bool = False) -> np.ndarray:
    names = ("spacing", "origin", "row_direction", "column_direction")
    return expected_affine(**{name: kwargs[name] for name in names if name in kwargs}, ras=ras)


def simpleitk_reference(folder: Path) -> sitk.Image:
    """SimpleITK's own answer: GDCM sorts the files, ImageSeriesReader reads them."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def assert_no_leak(text: str) -> None:
    assert not [value for value in LEAKS if value in text]


def load(path: str | Path, reader: str | None = READER) -> object:
    """The bundles' loading step, channel first."""
    loader = LoadImaged("image", reader=reader, ensure_channel_first=True, image_only=True)
    return loader({"image": str(path)})["image"]


@pytest.mark.parametrize("name", GEOMETRIES)
def test_series_geometry_and_hu_match_simpleitk(tmp_path: Path, name: str) -> None:
    kwargs = GEOMETRIES[name]
    volume = stored_volume()
    files = write_series(tmp_path, volume, **kwargs)
    assert sorted(files) != files  # the directory order is not the slice order
    hu = volume * kwargs.get("slope", 1.0) + kwargs.get("intercept", -1024.0)

    image = read_series(tmp_path)
    np.testing.assert_allclose(sitk_affine(image, lps_to_ras=False), affine_of(kwargs), atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).T, hu, atol=1e-3)
    reference = simpleitk_reference(tmp_path)
    assert_same_geometry(image, reference)

    tensor = load(tmp_path)
    assert tuple(tensor.shape) == (1, *SHAPE)
    np.testing.assert_allclose(tensor.affine.numpy(), affine_of(kwargs, ras=True), atol=1e-4)
    np.testing.assert_allclose(tensor.affine.numpy(), sitk_affine(reference), atol=1e-4)
    np.testing.assert_allclose(tensor[0].numpy(), hu, atol=1e-3)


def test_order_comes_from_positions_not_instance_numbers(tmp_path: Path) -> None:
    volume = stored_volume()
    files = write_series(tmp_path, volume)
    for path, number in zip(files, np.random.default_rng(1).permutation(len(files)) + 1, strict=True):
        header = pydicom.dcmread(path)
        header.InstanceNumber = int(number)
        header.save_as(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_series(tmp_path)).T, volume - 1024)
    np.testing.assert_allclose(load(tmp_path).affine.numpy(), expected_affine(ras=True), atol=1e-4)


def test_nifti_loads_as_with_monai_default_reader(tmp_path: Path) -> None:
    write_series(tmp_path / "series", stored_volume(), **GEOMETRIES["oblique"])
    nifti = dicom_to_nifti(tmp_path / "series", tmp_path / "nifti")[0]
    ours, default = load(nifti), load(nifti, reader=None)
    np.testing.assert_array_equal(ours.numpy(), default.numpy())
    np.testing.assert_array_equal(ours.affine.numpy(), default.affine.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), load(tmp_path / "series").affine.numpy(), atol=1e-4)
    pickle.dumps(LoadImaged("image", reader=READER))  # DataLoader workers get a copy


def test_bundle_config_names_the_reader(tmp_path: Path) -> None:
    write_series(tmp_path, stored_volume())
    step = {"_target_": "LoadImaged", "keys": "image", "reader": READER, "ensure_channel_first": True}
    loader = ConfigParser({"load": step}).get_parsed_content("load")
    np.testing.assert_allclose(loader({"image": str(tmp_path)})["image"].affine, expected_affine(ras=True))


def test_predictions_for_series_named_by_uid_do_not_collide(tmp_path: Path) -> None:
    folder = tmp_path / "1.2.840.99.1"  # PACS exports often name series folders by UID
    uid_a, uid_b = "1.2.840.99.2.1", "1.2.840.99.2.2"  # differing only in the last component
    write_series(folder, stored_volume(0), series_uid=uid_a)
    write_series(folder, stored_volume(1), series_uid=uid_b, rng_seed=1)
    sitk.WriteImage(read_series(f"{folder}#{uid_a}"), str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "out"
    save = SaveImaged(
        "image",
        output_dir=out,
        output_postfix="seg",
        separate_folder=False,
        output_name_formatter=series_name_formatter,
    )
    for path in (f"{folder}#{uid_a}", f"{folder}#{uid_b}", tmp_path / "scan.nii.gz"):
        save({"image": load(path)})
    names = sorted(path.name for path in out.iterdir())
    assert len(names) == 3 and names[2] == "scan_seg.nii.gz"  # NIfTI inputs keep MONAI's naming
    assert all(re.fullmatch(r"1\.2\.840\.99\.1_[0-9a-f]{8}_seg\.nii\.gz", name) for name in names[:2])


def write_dicomdir(path: Path) -> None:
    """A DICOMDIR index: a valid DICOM file that is not a slice."""
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.FileSetID = "EXPORT"
    index.save_as(path, enforce_file_format=True)


def test_stray_files_are_ignored(tmp_path: Path) -> None:
    files = write_series(tmp_path, stored_volume())
    (tmp_path / ".DS_Store").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "README.txt").write_text("exported from PACS\n")
    write_dicomdir(tmp_path / "DICOMDIR")
    (tmp_path / "sub").mkdir()
    assert is_dicom_file(files[0]) and not is_dicom_file(tmp_path / "README.txt")
    assert not is_dicom_file(tmp_path / "sub") and is_series_path(tmp_path)
    assert [sorted(group) for group in find_series(tmp_path).values()] == [sorted(files)]
    assert read_series(tmp_path).GetSize() == SHAPE
    assert tuple(load(tmp_path).shape) == (1, *SHAPE)


def test_several_series_in_one_folder_are_refused_and_selectable(tmp_path: Path) -> None:
    uid_a, uid_b = generate_uid(), generate_uid()
    write_series(tmp_path, stored_volume(0), series_uid=uid_a)
    write_series(tmp_path, stored_volume(1), series_uid=uid_b, origin=(0, 0, 0), series_number=4, rng_seed=1)
    with pytest.raises(MultipleSeriesError) as error:
        read_series(tmp_path)
    assert error.value.series_uids == sorted([uid_a, uid_b]) and uid_a in str(error.value)
    assert uid_b in str(error.value) and f"{tmp_path}#" in str(error.value)
    assert_no_leak(str(error.value))

    picked = read_series(f"{tmp_path}#{uid_b}")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(picked).T, stored_volume(1) - 1024)
    np.testing.assert_allclose(load(f"{tmp_path}#{uid_a}").affine.numpy(), expected_affine(ras=True))
    with pytest.raises(ValueError, match=r"holds no series 1\.2\.3"):
        read_series(f"{tmp_path}#1.2.3")


def test_missing_slice_is_a_clear_error(tmp_path: Path) -> None:
    files = write_series(tmp_path, stored_volume())
    files[3].unlink()
    message = re.escape(f"{tmp_path}: slices are not evenly spaced: a gap of 5.000 mm")
    with pytest.raises(SeriesGeometryError, match=message):
        read_series(tmp_path)
    with pytest.raises(SeriesGeometryError, match="is a slice missing"):
        load(tmp_path)  # not swallowed by LoadImage trying MONAI's PydicomReader instead
    pipeline = Compose([LoadImaged("image", reader=READER)])
    with pytest.raises(RuntimeError) as error:
        pipeline({"image": str(tmp_path)})
    assert isinstance(error.value.__cause__, SeriesGeometryError)


def test_duplicate_slices_are_a_clear_error(tmp_path: Path) -> None:
    uid = generate_uid()
    write_series(tmp_path, stored_volume(), series_uid=uid)
    write_series(tmp_path, stored_volume(), series_uid=uid, rng_seed=1)
    with pytest.raises(SeriesGeometryError, match="share one position"):
        read_series(tmp_path)


@pytest.mark.parametrize("keep", [300, -50], ids=["header", "pixels"])
def test_truncated_file_is_named(tmp_path: Path, keep: int) -> None:
    files = write_series(tmp_path, stored_volume())
    content = files[2].read_bytes()
    files[2].write_bytes(content[:keep])
    with pytest.raises(DicomReadError, match=re.escape(str(files[2]))) as error:
        read_series(tmp_path)
    shown = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
    assert shown is None  # no pydicom or ITK exception chained under ours


def write_tree(root: Path) -> dict[str, Path]:
    """A PACS export: two image series, a localizer (mixed orientations), stray files."""
    study = root / "study"
    write_series(study / "ct", stored_volume(0), series_number=2)
    write_series(study / "mr", stored_volume(1), modality="MR", series_number=7, **GEOMETRIES["oblique"])
    uid = generate_uid()
    write_series(study / "scout", stored_volume(2)[:, :, :1], series_uid=uid, rng_seed=1)
    write_series(study / "scout", stored_volume(2)[:, :, :1], series_uid=uid, column_direction=(0, 0, -1))
    (study / "ct" / ".DS_Store").write_bytes(b"\0" * 64)
    write_dicomdir(root / "DICOMDIR")
    return {"CT": study / "ct", "MR": study / "mr"}


def test_dicom_to_nifti_converts_a_tree_without_identifiers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = write_tree(tmp_path / "export")
    with caplog.at_level(logging.INFO, logger="pipeline.io.dicom"):
        written = dicom_to_nifti(tmp_path / "export", tmp_path / "out")
    assert sorted(path.name[:6] for path in written) == ["CT_S00", "MR_S00"]
    assert "skipped series" in caplog.text and "different orientations" in caplog.text
    for path in written:
        assert re.fullmatch(r"(CT|MR)_S00[27]_[0-9a-f]{8}\.nii\.gz", path.name)
        converted, source = sitk.ReadImage(str(path)), read_series(sources[path.name[:2]])
        assert_same_geometry(converted, source)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(source))
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert set(sidecar) <= {*SIDECAR_FIELDS, "spacing_mm", "size", "rescaled"}
        assert sidecar["size"] == list(SHAPE) and sidecar["Manufacturer"] == "Synthetic"
        assert_no_leak(json.dumps(sidecar) + gzip.decompress(path.read_bytes()).decode("latin-1"))
    assert_no_leak(caplog.text + " ".join(path.name for path in (tmp_path / "out").iterdir()))


def test_dicom2nifti_command_prints_the_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_series(tmp_path / "series", stored_volume())
    assert main(["dicom2nifti", str(tmp_path / "series"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(path) for path in sorted((tmp_path / "out").glob("*.nii.gz"))]
    assert len(printed) == 1


def test_real_ct_series_matches_simpleitk(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "totalsegmentator_example" / "dicom_ct_series"
    image, reference = read_series(folder), simpleitk_reference(folder)
    assert_same_geometry(image, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    # The spacing between slices comes from the positions (2 mm), not from SliceThickness (3 mm).
    assert float(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SliceThickness) == 3.0
    assert image.GetSpacing()[2] == pytest.approx(2.0)

    tensor = load(folder)
    np.testing.assert_allclose(tensor.affine.numpy(), sitk_affine(reference), atol=1e-4)
    converted = sitk.ReadImage(str(dicom_to_nifti(folder, tmp_path)[0]))
    assert_same_geometry(converted, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(image))
    nifti = next(tmp_path.glob("*.nii.gz"))
    np.testing.assert_allclose(load(nifti).affine.numpy(), tensor.affine.numpy(), atol=1e-4)


def test_monai_ct_dicom_gap_refused_regular_part_matches(shared_data: Path, tmp_path: Path) -> None:
    """MONAI's 4-file test series jumps 202.5 mm after its first slice; SimpleITK only warns about it."""
    folder = shared_data / "monai_testing_data" / "CT_DICOM"
    with pytest.raises(SeriesGeometryError, match=r"gap of 202\.500 mm"):
        read_series(folder)
    with pytest.raises(SeriesGeometryError):
        dicom_to_nifti(folder, tmp_path / "refused")
    for name in ("7136", "7166", "7196"):  # three slices 1.25 mm apart, copied out of the shared folder
        shutil.copy(folder / name, tmp_path / name)
    image, reference = read_series(tmp_path), simpleitk_reference(tmp_path)
    assert_same_geometry(image, reference)
    assert image.GetSpacing()[2] == pytest.approx(1.25, abs=1e-4)
    np.testing.assert_allclose(load(tmp_path).affine.numpy(), sitk_affine(reference), atol=1e-4)
    nifti = dicom_to_nifti(tmp_path, tmp_path / "out")[0]
    assert_same_geometry(sitk.ReadImage(str(nifti)), reference)
    assert_no_leak(nifti.name + nifti.with_name(nifti.name.replace(".nii.gz", ".json")).read_text())


@pytest.mark.parametrize("spacing", [["0", "0.8"], ["nan", "0.8"], ["-0.8", "0.8"]])
def test_an_invalid_pixel_spacing_is_named_not_defaulted(tmp_path: Path, spacing: list[str]) -> None:
    files = write_series(tmp_path, stored_volume())
    broken = pydicom.dcmread(files[1])
    broken.PixelSpacing = spacing
    broken.save_as(files[1])
    with pytest.raises(SeriesGeometryError, match=re.escape(str(files[1])) + ".*PixelSpacing"):
        read_series(tmp_path)


def test_a_multi_frame_file_counts_its_frames_in_the_size_guard(tmp_path: Path) -> None:
    """Two files of 16x12 pixels are tiny, but they declare 10**7 frames each: 15 GiB as float32."""
    for path in write_series(tmp_path / "enhanced", stored_volume()[:, :, :2], shuffle=False):
        header = pydicom.dcmread(path)
        header.NumberOfFrames = 10**7
        header.save_as(path)
    with pytest.raises(DicomReadError, match=r"16x12x20000000 voxels .* over the memory budget"):
        read_series(tmp_path / "enhanced")


def test_dicom2nifti_reports_an_unreadable_file_converts_the_rest_and_keeps_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sources = write_tree(tmp_path / "export")
    damaged = sources["CT"] / "damaged.dcm"
    damaged.write_bytes(next(sources["MR"].glob("*")).read_bytes()[:300])  # DICM magic, then cut off
    assert main(["dicom2nifti", str(tmp_path / "export"), str(tmp_path / "out")]) == 1
    printed, errors = capsys.readouterr()
    assert sorted(Path(line).name[:2] for line in printed.split()) == ["CT", "MR"], "the others converted"
    assert "1 DICOM file(s) or series could not be converted" in errors and f"{damaged}: " in errors
    outputs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outputs if p.name.startswith(".")] == [], "no temporary file left"
    nifti = next(p for p in outputs if p.name.endswith(".nii.gz"))
    nifti.write_bytes(b"edited by the user")
    damaged.unlink()
    assert dicom_to_nifti(tmp_path / "export", tmp_path / "out") == [], "existing outputs are kept"
    assert nifti.read_bytes() == b"edited by the user"
    assert len(dicom_to_nifti(tmp_path / "export", tmp_path / "out", overwrite=True)) == 2
    assert sitk.ReadImage(str(nifti)).GetSize() == SHAPE
