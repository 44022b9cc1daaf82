"""DICOM SEG export checked by reading the written file back with highdicom, slice by source slice.

The label NIfTI is always made independently of the code under test: SimpleITK reads the series
(its own slice sorting and geometry), the labels are drawn in its array, and SimpleITK writes the
NIfTI. The SEG must then reproduce that array on every source instance, whatever the file order,
orientation or NIfTI axis order.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from dicom_factory import IDENTIFIERS, write_series
from monai.data import MetaTensor
from pydicom.uid import CTImageStorage, generate_uid

from pipeline.inference import WriteDicomSegd
from pipeline.inference.batch import cases_to_segment, dicom_seg_path, output_path
from pipeline.io.dicom_seg import DicomSegError, EmptySegmentationError, write_dicom_seg

NAMES = {1: "liver", 2: "spleen", 3: "tumour"}


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    z, x = np.radians(z_degrees), np.radians(x_degrees)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x


OBLIQUE = rotation(20, 15)
GEOMETRIES = {
    "axial": {"row_direction": (1, 0, 0), "column_direction": (0, 1, 0)},
    "oblique": {"row_direction": OBLIQUE[:, 0], "column_direction": OBLIQUE[:, 1]},
    "sagittal": {"row_direction": (0, 1, 0), "column_direction": (0, 0, -1)},
}


def two_organs(array: np.ndarray) -> np.ndarray:
    """Labels 1 and 3 (2 absent) in asymmetric boxes, so any flip or transpose changes the result."""
    labels = np.zeros(array.shape, np.uint8)
    labels[1:4, 2:9, 3:15] = 1
    labels[5:7, 10:18, 12:20] = 3
    return labels


def label_nifti(series: Path, out: Path, draw=two_organs) -> dict[str, np.ndarray]:
    """Write labels drawn in SimpleITK's view of the series; returns SOPInstanceUID -> (rows, columns)."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series))
    reader.SetFileNames(files)
    image = reader.Execute()
    labels = draw(sitk.GetArrayFromImage(image))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(out))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    return dict(zip(uids, labels, strict=True))


def synthetic_series(folder: Path, **geometry) -> Path:
    volume = np.random.default_rng(0).integers(0, 2000, size=(24, 20, 8)).astype(np.int16)
    write_series(folder, volume, spacing=(0.8, 0.9, 2.5), shuffle=True, **geometry)
    return folder


def assert_round_trip(seg_path: Path, series: Path, expected: dict[str, np.ndarray], names: dict) -> None:
    """Referenced UIDs are the source's, and each source instance's pixels equal its label slice."""
    seg = hd.seg.segread(seg_path)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.iterdir()]
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {d.SOPInstanceUID for d in source}
    assert {series_uid for _, series_uid, _ in seg.get_source_image_uids()} == {source[0].SeriesInstanceUID}
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    present = sorted(int(v) for v in np.unique(np.stack(list(expected.values()))) if v)
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == [names[v] for v in present]
    to_value = np.array([0, *present])
    pixels = seg.get_pixels_by_source_instance(
        list(expected), combine_segments=True, assert_missing_frames_are_empty=True
    )
    for uid, frame in zip(expected, pixels, strict=True):
        np.testing.assert_array_equal(to_value[frame], expected[uid], err_msg=f"instance {uid}")


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_round_trip_on_synthetic_series(tmp_path: Path, geometry: str, caplog) -> None:
    series = synthetic_series(tmp_path / "series", **GEOMETRIES[geometry])
    expected = label_nifti(series, tmp_path / "labels.nii.gz")
    caplog.set_level(logging.DEBUG)
    out = write_dicom_seg(tmp_path / "labels.nii.gz", series, tmp_path / "out" / "seg.dcm", NAMES)
    assert_round_trip(out, series, expected, NAMES)
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == "Segmentation"
    assert seg.SegmentSequence[1].SegmentDescription == "tumour (label value 3)"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert (
        seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName
        == "medseg-pipeline"
    )
    assert seg.PatientID == IDENTIFIERS["PatientID"]  # the SEG files under its patient, as DICOM requires
    assert not any(value in caplog.text for value in IDENTIFIERS.values())
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]  # no temporary file left behind


def test_nifti_axis_order_and_dtype_do_not_matter(tmp_path: Path) -> None:
    """The same labels stored transposed, flipped and as float32 (as MONAI may save) give the same SEG."""
    series = synthetic_series(tmp_path / "series", **GEOMETRIES["oblique"])
    expected = label_nifti(series, tmp_path / "labels.nii.gz")
    image = nib.load(tmp_path / "labels.nii.gz")
    shuffled = image.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
    floats = nib.Nifti1Image(np.asarray(shuffled.dataobj, dtype=np.float32), shuffled.affine)
    nib.save(floats, tmp_path / "shuffled.nii.gz")
    out = write_dicom_seg(tmp_path / "shuffled.nii.gz", series, tmp_path / "seg.dcm", NAMES)
    assert_round_trip(out, series, expected, NAMES)


@pytest.mark.parametrize("shift_slices", [3, 40])
def test_label_volume_from_elsewhere_is_refused(tmp_path: Path, shift_slices: int) -> None:
    series = synthetic_series(tmp_path / "series")
    label_nifti(series, tmp_path / "labels.nii.gz")
    image = nib.load(tmp_path / "labels.nii.gz")
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 2] * shift_slices
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), tmp_path / "moved.nii.gz")
    with pytest.raises(DicomSegError, match=r"moved\.nii\.gz.*outside the label volume"):
        write_dicom_seg(tmp_path / "moved.nii.gz", series, tmp_path / "seg.dcm", NAMES)
    assert not (tmp_path / "seg.dcm").exists()


def test_no_foreground_is_refused(tmp_path: Path) -> None:
    series = synthetic_series(tmp_path / "series")
    label_nifti(series, tmp_path / "empty.nii.gz", draw=lambda a: np.zeros(a.shape, np.uint8))
    with pytest.raises(EmptySegmentationError, match=r"empty\.nii\.gz has no foreground"):
        write_dicom_seg(tmp_path / "empty.nii.gz", series, tmp_path / "seg.dcm", NAMES)
    assert not (tmp_path / "seg.dcm").exists()


def test_two_series_in_one_folder_are_refused(tmp_path: Path) -> None:
    series = synthetic_series(tmp_path / "series")
    label_nifti(series, tmp_path / "labels.nii.gz")
    write_series(series, np.zeros((24, 20, 2), np.int16), shuffle=False)
    with pytest.raises(DicomSegError, match=r"exactly one image series, found 2.*slice_0000\.dcm"):
        write_dicom_seg(tmp_path / "labels.nii.gz", series, tmp_path / "seg.dcm", NAMES)


def test_unnamed_and_fractional_labels_are_refused(tmp_path: Path) -> None:
    series = synthetic_series(tmp_path / "series")
    label_nifti(series, tmp_path / "labels.nii.gz")
    with pytest.raises(DicomSegError, match=r"labels \[3\] that label_names does not name"):
        write_dicom_seg(tmp_path / "labels.nii.gz", series, tmp_path / "seg.dcm", {1: "liver"})
    image = nib.load(tmp_path / "labels.nii.gz")
    probabilities = nib.Nifti1Image(np.asarray(image.dataobj) * 0.3, image.affine)
    with pytest.raises(DicomSegError, match="non-negative integer labels"):
        write_dicom_seg(probabilities, series, tmp_path / "seg.dcm", NAMES)


def restore_uids(source: Path, target: Path) -> Path:
    """A copy of a de-identified series whose blanked UIDs are filled in (pixel data untouched)."""
    target.mkdir()
    shared = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    for path in sorted(source.iterdir()):
        data = pydicom.dcmread(path)
        data.SOPClassUID = CTImageStorage
        data.SOPInstanceUID = data.file_meta.MediaStorageSOPInstanceUID
        for key, value in shared.items():
            setattr(data, key, value)
        data.save_as(target / path.name)
    return target


def test_real_ct_series_round_trips(shared_data: Path, tmp_path: Path) -> None:
    original = shared_data / "totalsegmentator_example" / "dicom_ct_series"
    label_nifti(original, tmp_path / "bone.nii.gz", draw=lambda a: (a > 200).astype(np.uint8))
    # As shipped, the example is de-identified with its SOP/series/study UIDs blanked: nothing to reference.
    with pytest.raises(DicomSegError, match="has no SOPClassUID, SOPInstanceUID, SeriesInstanceUID"):
        write_dicom_seg(tmp_path / "bone.nii.gz", original, tmp_path / "seg.dcm", {1: "bone"})
    series = restore_uids(original, tmp_path / "series")
    expected = label_nifti(series, tmp_path / "bone.nii.gz", draw=lambda a: (a > 200).astype(np.uint8))
    out = write_dicom_seg(tmp_path / "bone.nii.gz", series, tmp_path / "seg.dcm", {1: "bone"})
    assert_round_trip(out, series, expected, {1: "bone"})


def test_output_inside_the_series_folder_is_not_read_as_a_second_series(tmp_path: Path) -> None:
    """Re-running with the SEG written beside its source replaces it instead of tripping over it."""
    series = synthetic_series(tmp_path / "series")
    expected = label_nifti(series, tmp_path / "labels.nii.gz")
    for _ in range(2):
        out = write_dicom_seg(tmp_path / "labels.nii.gz", series, series / "seg.dcm", NAMES)
    moved = shutil.move(out, tmp_path / "seg.dcm")
    assert_round_trip(Path(moved), series, expected, NAMES)


def test_write_dicom_segd_takes_the_series_a_folder_uid_input_names(tmp_path: Path) -> None:
    """The inference transform with a ``folder#uid`` input, one of two series in the folder; a label
    name with a backslash (DICOM's value separator) stays one SegmentLabel and its name whole."""
    series = synthetic_series(tmp_path / "series")
    saved = tmp_path / "out" / "case_seg.nii.gz"  # what SaveImaged wrote before the transform runs
    saved.parent.mkdir()
    expected = label_nifti(series, saved)
    uid = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    write_series(series, np.zeros((24, 20, 2), np.int16), shuffle=False)  # a second series beside it
    names = {1: "kidney\\left", 2: "spleen", 3: "tumour"}
    data = {
        "image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": f"{series}#{uid}"}),
        "pred": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"saved_to": str(saved)}),
    }
    WriteDicomSegd(keys="pred", label_names=names)(data)
    seg = hd.seg.segread(tmp_path / "out" / "case_seg.dcm")
    assert {series_uid for _, series_uid, _ in seg.get_source_image_uids()} == {uid}
    assert {instance for _, _, instance in seg.get_source_image_uids()} == set(expected)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "kidney/left",
        "tumour",
    ]
    assert seg.SegmentSequence[0].SegmentDescription == "kidney\\left (label value 1)"
    pixels = seg.get_pixels_by_source_instance(list(expected), combine_segments=True)
    for instance, frame in zip(expected, pixels, strict=True):
        np.testing.assert_array_equal(np.array([0, 1, 3])[frame], expected[instance], err_msg=instance)


def test_a_rerun_with_dicom_seg_redoes_a_series_whose_seg_is_missing(tmp_path: Path) -> None:
    series = synthetic_series(tmp_path / "series")
    out = tmp_path / "out"
    (case,) = cases_to_segment([series], out, "seg", dicom_seg=True)
    nifti = output_path(series, out, "seg", case["case_name"])
    out.mkdir()
    label_nifti(series, nifti)  # a run that wrote the NIfTI and was killed before the SEG
    assert cases_to_segment([series], out, "seg", dicom_seg=True) == [case], "the SEG is still to write"
    assert cases_to_segment([series], out, "seg") == [], "without --dicom-seg the case is done"
    dicom_seg_path(nifti).write_bytes(b"a SEG")
    assert cases_to_segment([series], out, "seg", dicom_seg=True) == []
