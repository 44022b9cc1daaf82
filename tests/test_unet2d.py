"""The 2D path: the unet2d bundle through `python -m monai.bundle run` on small real PNG and TIFF files.

Train (2 epochs) -> resume -> inference (PNG in, PNG out; TIFF in, TIFF out, of the input's size) ->
evaluate (Dice, IoU, pixel and Rand error); the 0/255 masks of microscopy read as classes 0/1; the
data check accepting 2D images and refusing a 2D label of a 3D image; 2D wherever a bundle's network
allows it (the `spatial_dims` key).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tiny, write_planar_dataset
from monai.networks.nets import BasicUNet

from pipeline.data.build import build_datalist
from pipeline.data.check import check_case, check_datalist
from pipeline.data.datalist import cases, label_names, label_values, pixel_classes
from pipeline.io.checkpoint import load_checkpoint, network_weights
from pipeline.io.readers import InputReader
from pipeline.networks import RonnebergerUNet
from pipeline.paths import PROJECT_ROOT, config_files, meta_files
from pipeline.transforms import LabelValuesd
from pipeline.workflows import LOGGING_FILE, bundle_parser, evaluate, infer, train


def monai_bundle_run(workflow: str, **settings: object) -> None:
    """unet2d's docs/README.md command, with the tiny network and the test's settings."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--meta_file", str(meta_files("unet2d")), "--config_file", str(config_files("unet2d", workflow)),
        "--logging_file", str(LOGGING_FILE), "--bundle_root", str(PROJECT_ROOT / "bundles" / "unet2d"),
    ]  # fmt: skip
    for key, value in {**tiny("unet2d"), **settings}.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(planar_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unet2d")
    monai_bundle_run(
        "train", datalist=str(planar_datalist), ckpt_dir=str(root / "models"), output_dir=str(root),
        max_epochs=2, tracking_uri=f"sqlite:///{root / 'mlruns.db'}",
    )  # fmt: skip
    return root


def test_medseg_datalist_states_the_0_255_masks_as_one_class(planar_datalist: Path) -> None:
    assert label_names(planar_datalist) == {0: "background", 1: "foreground"}
    assert label_values(planar_datalist) == {0: 0, 255: 1}


def test_a_0_255_mask_is_read_as_classes_0_and_1(planar_datalist: Path) -> None:
    case = cases(planar_datalist, role="train")[0]
    label = InputReader().get_data(InputReader().read(case["label"]))[0]
    assert set(np.unique(label)) == {0, 255}
    as_classes = LabelValuesd("label", num_classes=2)({"label": torch.as_tensor(label)})["label"]
    assert set(torch.unique(as_classes).tolist()) == {0, 1}
    mapped = LabelValuesd("label", {0: 0, 255: 1})({"label": torch.as_tensor(label)})["label"]
    assert torch.equal(mapped, as_classes.to(mapped.dtype))
    with pytest.raises(ValueError, match="do not map"):
        LabelValuesd("label", {0: 0, 128: 1})({"label": torch.as_tensor(label)})


def test_16_bit_and_multi_page_tiffs_keep_their_values_and_pages(tmp_path: Path) -> None:
    """A 16-bit TIFF keeps values over 255; a multi-page TIFF is a stack (x, y, page), as SimpleITK
    reads it; a grey picture saved as RGB is one channel."""
    pages = np.arange(3 * 12 * 10, dtype=np.uint16).reshape(3, 12, 10) * 50  # page, y, x; up to 17950
    sitk.WriteImage(sitk.GetImageFromArray(pages), str(tmp_path / "stack.tif"))
    stack, _ = InputReader().get_data(InputReader().read(str(tmp_path / "stack.tif")))
    assert stack.shape == (10, 12, 3) and np.array_equal(stack, pages.transpose(2, 1, 0))
    grey = np.repeat(pages[0, ..., None].astype(np.uint8), 3, axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(grey, isVector=True), str(tmp_path / "grey_rgb.png"))
    picture, _ = InputReader().get_data(InputReader().read(str(tmp_path / "grey_rgb.png")))
    assert picture.shape == (10, 12) and np.array_equal(picture, pages[0].T.astype(np.uint8))


def test_the_check_accepts_2d_images_and_refuses_a_2d_label_of_a_volume(
    planar_datalist: Path, phantom_datalist: Path, tmp_path: Path
) -> None:
    assert not [f for f in check_datalist(planar_datalist) if f.severity == "error"]
    values = pixel_classes(label_names(planar_datalist), label_values(planar_datalist))
    planar = cases(planar_datalist, role="train")[0]
    volume = cases(phantom_datalist, role="train")[0]
    findings = check_case({"image": volume["image"], "label": planar["label"]}, values, 1)
    assert any("shape" in str(f) and f.severity == "error" for f in findings), findings
    unmapped = {**json.loads(planar_datalist.read_text()), "label_values": {"0": 0, "128": 1}}
    (tmp_path / "unmapped.json").write_text(json.dumps(unmapped))
    datalist = tmp_path / "unmapped.json"
    problems = [str(f) for f in check_datalist(datalist, planar_datalist.parent) if f.severity == "error"]
    assert any("255" in problem and "not declared" in problem for problem in problems), problems


def test_training_writes_a_2d_network(trained: Path) -> None:
    weights = network_weights(load_checkpoint(trained / "models" / "model.pt"))
    convolutions = [w for w in weights.values() if w.ndim >= 4]
    assert convolutions and all(w.ndim == 4 for w in convolutions), "2D convolutions (4-D weights)"


def test_rerunning_training_resumes(trained: Path, planar_datalist: Path) -> None:
    train("unet2d", planar_datalist, trained, epochs=3, overrides=tiny("unet2d"), tracking=False, plan=False)
    latest = torch.load(trained / "models" / "latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == 3 * latest["trainer"]["epoch_length"]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_segmentations_are_written_in_the_input_format_and_size(
    trained: Path, tmp_path: Path, suffix: str
) -> None:
    images = sorted(
        (write_planar_dataset(tmp_path / "in", suffix, num_cases=1, shape=(37, 70)) / "images").iterdir()
    )
    out = tmp_path / "predictions"
    monai_bundle_run("inference", input=[str(p) for p in images], output_dir=str(out),
                     checkpoint=str(trained / "models" / "model.pt"))  # fmt: skip
    for image in images:
        prediction = out / f"{image.stem}_seg{suffix}"
        assert prediction.is_file(), sorted(p.name for p in out.iterdir())
        written, source = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(image))
        assert written.GetSize() == source.GetSize() == (70, 37)
        assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}


def test_evaluation_reports_dice_and_the_2d_measures(trained: Path, planar_datalist: Path) -> None:
    out = evaluate("unet2d", planar_datalist, trained / "evaluation", trained / "models" / "model.pt",
                   "validation", {**tiny("unet2d"), "tracking_required": False})  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    means = summary["variants"]["postprocessed"]["summary"]["mean"]
    assert {"dice", "iou", "pixel_error", "rand_error"} <= set(means)
    assert 0.0 <= means["pixel_error"]["mean"] <= 1.0


def test_the_2d_unet_pads_only_an_odd_edge_and_computes_what_basic_unet_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A no-op pad in every up-sampling step broke torch.compile's backward (bench.compile_speed)."""
    torch.manual_seed(0)
    features = (4, 8, 16, 32, 64)
    ours = RonnebergerUNet(features=features).eval()
    basic = BasicUNet(2, 1, 2, features=(*features, 4), act=("relu", {"inplace": True}),
                      norm=("instance", {"affine": True}), dropout=0.0, upsample="deconv").eval()  # fmt: skip
    basic.load_state_dict(
        {key.replace("down_4.0.", "down_4."): value for key, value in ours.state_dict().items()}
    )
    pads: list[tuple[int, ...]] = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(
        torch.nn.functional, "pad", lambda x, pad, *a, **k: pads.append(pad) or original(x, pad, *a, **k)
    )
    with torch.no_grad():
        for shape, padded in (((1, 1, 32, 48), 0), ((1, 1, 35, 45), 4)):  # an odd edge at every level
            image = torch.randn(shape)
            pads.clear()
            segmented = ours(image)
            assert len(pads) == padded, f"{shape}: {pads}"
            assert torch.equal(segmented, basic(image)) and segmented.shape[2:] == shape[2:]


@pytest.mark.parametrize("bundle", ["unet3d", "resunet", "attention_unet", "multiresunet", "unetr"])
def test_every_3d_bundle_builds_a_2d_network_from_one_key(bundle: str) -> None:
    keys = {**tiny(bundle), "spatial_dims": 2, "patch_size": [32, 32], "in_channels": 1, "num_classes": 2}
    network = bundle_parser(bundle, "inference", keys, meta=False).get_parsed_content("network_def").eval()
    assert network(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_a_2d_dataset_is_planned_in_2d(planar_datalist: Path, tmp_path: Path) -> None:
    from pipeline.planning.plan import plan_datalist

    plan, _ = plan_datalist(planar_datalist, "unet2d", output=tmp_path / "plan.yaml")
    assert plan.spatial_dims == 2 and len(plan.patch_size) == 2 and len(plan.spacing) == 2
    assert all(size % 16 == 0 for size in plan.patch_size)
    plan3d, _ = plan_datalist(planar_datalist, "unet3d", output=tmp_path / "plan3d.yaml")
    assert "spatial_dims: 2" in (tmp_path / "plan3d.yaml").read_text() and len(plan3d.patch_size) == 2


def test_volumes_are_planned_slice_wise_for_a_2d_network(phantom_datalist: Path, tmp_path: Path) -> None:
    from pipeline.planning.plan import plan_datalist

    plan, _ = plan_datalist(phantom_datalist, "unet2d", output=tmp_path / "plan.yaml")
    assert plan.spatial_dims == 2 and plan.slice_axis == 2, "the phantoms' 1.5 mm axis is the coarsest"
    assert len(plan.patch_size) == 2 and len(plan.spacing) == 3
    resunet, _ = plan_datalist(phantom_datalist, "resunet", output=tmp_path / "r.yaml", spatial_dims=2)
    assert resunet.slice_axis == 2 and len(resunet.patch_size) == 2


def test_datalist_finds_singular_image_and_label_folders(tmp_path: Path) -> None:
    root = write_planar_dataset(tmp_path / "em", num_cases=2)
    (root / "images").rename(root / "image")
    (root / "labels").rename(root / "label")
    datalist = build_datalist(root, tmp_path / "datalist.json", folds=2)
    assert len(cases(datalist, role="all")) == 2


def test_a_2d_network_segments_volumes_slice_by_slice(phantom_datalist: Path, tmp_path: Path) -> None:
    """Trained on the volumes' axial slices, applied slice by slice: the segmentation is back in each
    input's 3D space (its shape and affine), as the 3D path guarantees."""
    overrides = {**tiny("unet2d"), "slice_axis": 2, "spacing": [2.0, 2.0, 2.0]}
    models = train("unet2d", phantom_datalist, tmp_path / "run", epochs=1, overrides=overrides,
                   tracking=False, plan=False)  # fmt: skip
    images = [case["image"] for case in cases(phantom_datalist, role="test")]
    out = infer("unet2d", images, tmp_path / "predictions", models / "model.pt", tracking=False)
    for image in images:
        source = nib.load(image)
        prediction = nib.load(out / f"{Path(image).name.removesuffix('.nii.gz')}_seg.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
