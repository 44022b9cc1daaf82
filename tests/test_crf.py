"""The mean-field CRF: one iteration worked by hand, what it does to noisy two-region probabilities,
3D volumes, and its place in the inference post-processing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_AFFINE, phantom
from monai.data import MetaTensor
from monai.transforms import Activationsd

from pipeline.bundle_parser import bundle_parser
from pipeline.postprocessing import CRFKernels, CRFRefined, DropBackgroundd, mean_field

LABELS = {"0": "background", "1": "organ", "2": "core"}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_one_iteration_matches_the_hand_computation() -> None:
    """Three pixels in a row, two classes, intensities 0, 0, 3; every width 1, so both windows reach
    2 pixels and hold all three. With two classes, Potts gives Q_i(0) = sigmoid(log(P_i(0) / P_i(1))
    + m_i(0) - m_i(1)), m the kernel-weighted neighbour probabilities per unit of kernel mass:
    k_s(d) = e^(-d^2/2), k_b = e^(-d^2/2 - dI^2/2), both of mass M = 2 (e^-0.5 + e^-2)."""
    probs = torch.tensor([[0.8, 0.4, 0.3], [0.2, 0.6, 0.7]])
    features = torch.tensor([[0.0, 0.0, 3.0]]) / math.sqrt(2)  # intensities / (sqrt(2) theta_beta)
    kernels = CRFKernels(
        spatial_sigma=1, spatial_weight=1, bilateral_sigma=1, intensity_sigma=1, bilateral_weight=1
    )
    e, mass = math.exp, 2 * (math.exp(-0.5) + math.exp(-2))
    # pixel 0: pixel 1 at d 1, dI 0 (P(0) - P(1) = -0.2); pixel 2 at d 2, dI 3 (-0.4)
    first = math.log(0.8 / 0.2) + (-0.2 * (e(-0.5) + e(-0.5)) - 0.4 * (e(-2) + e(-2 - 4.5))) / mass
    # pixel 1: pixel 0 at d 1, dI 0 (+0.6); pixel 2 at d 1, dI 3 (-0.4)
    middle = math.log(0.4 / 0.6) + (0.6 * (e(-0.5) + e(-0.5)) - 0.4 * (e(-0.5) + e(-0.5 - 4.5))) / mass
    # pixel 2: pixel 1 at d 1, dI 3 (-0.2); pixel 0 at d 2, dI 3 (+0.6)
    last = math.log(0.3 / 0.7) + (-0.2 * (e(-0.5) + e(-0.5 - 4.5)) + 0.6 * (e(-2) + e(-2 - 4.5))) / mass
    expected = torch.tensor([sigmoid(first), sigmoid(middle), sigmoid(last)])
    refined = mean_field(probs, features, kernels, iterations=1)
    torch.testing.assert_close(refined[0], expected)  # about 0.693, 0.506 (flipped to class 0), 0.321
    torch.testing.assert_close(refined.sum(0), torch.ones(3))


def two_regions(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left half class 0 (intensity 0), right half class 1 (intensity 1), both with noise; noisy
    probabilities that favour the truth at about 0.7, except at isolated pixels away from the image's
    border (every third row and column, half of them, the edge's left column among them), which favour
    the wrong class at 0.8."""
    rng = np.random.default_rng(3)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2 :] = 1
    image = truth + rng.normal(0, 0.1, truth.shape)
    right = np.clip(0.7 + rng.uniform(-0.15, 0.15, truth.shape), 0, 1)
    wrong = np.zeros(truth.shape, dtype=bool)
    wrong[1:-1:3, 3:-1:3] = rng.random(wrong[1:-1:3, 3:-1:3].shape) < 0.5
    right[wrong] = 0.2
    p1 = np.where(truth == 1, right, 1 - right)
    probs = torch.tensor(np.stack([1 - p1, p1]), dtype=torch.float32)
    return probs, torch.tensor(image[None], dtype=torch.float32), torch.tensor(truth)


def test_isolated_wrong_pixels_go_and_the_edge_stays() -> None:
    probs, image, truth = two_regions()
    assert (probs.argmax(0) != truth).sum() >= 40 and (probs.argmax(0)[:, 15] == 1).sum() >= 2
    labels = CRFRefined("pred")({"pred": probs, "image": image})["pred"].argmax(0)
    assert (labels == truth).all(), "the isolated wrong pixels are gone, none has been added"
    assert (labels[:, 15] == 0).all() and (labels[:, 16] == 1).all(), "the edge column stays where it is"
    smoothed = CRFRefined("pred", spatial_weight=3, bilateral_weight=0)({"pred": probs, "image": image})
    assert (smoothed["pred"].argmax(0)[:, 15] == 1).any(), "at the edge, it takes the appearance kernel"


def test_a_volume_keeps_its_shape_metadata_and_probabilities() -> None:
    torch.manual_seed(0)
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    probs = MetaTensor(torch.softmax(torch.randn(3, 16, 20, 12), 0), affine=affine)
    image = MetaTensor(torch.randn(2, 16, 20, 12) * torch.tensor([1.0, 100.0])[:, None, None, None])
    refined = CRFRefined("pred", iterations=3)({"pred": probs, "image": image})["pred"]
    assert isinstance(refined, MetaTensor) and refined.shape == probs.shape
    assert torch.equal(refined.affine, affine)
    torch.testing.assert_close(refined.sum(0), torch.ones(16, 20, 12))
    assert refined.min() >= 0 and not torch.equal(refined.as_tensor(), probs.as_tensor())


def test_probabilities_off_the_image_grid_are_refused() -> None:
    with pytest.raises(ValueError, match="grid"):
        CRFRefined("pred")({"pred": torch.full((2, 4, 4), 0.5), "image": torch.zeros(1, 4, 5)})


def inference_postprocessing(crf: bool, tmp_path: Path) -> list:
    info = tmp_path / "dataset.json"
    info.write_text(json.dumps({"labels": LABELS, "modality": {"0": "CT"}}))
    overrides = {"dataset_info": str(info), "output_dir": str(tmp_path), "data": [], "crf": crf}
    return bundle_parser("unet3d", "inference", overrides).get_parsed_content("postprocessing").transforms


@pytest.mark.parametrize("crf", [False, True])
def test_the_inference_config_refines_before_the_background_is_dropped_only_when_asked(
    crf: bool, tmp_path: Path
) -> None:
    steps = inference_postprocessing(crf, tmp_path)
    refiners = [step for step in steps if isinstance(step, CRFRefined)]
    assert len(refiners) == int(crf)
    without = [type(step) for step in steps if not isinstance(step, CRFRefined)]
    assert without[:2] == [Activationsd, DropBackgroundd] and without == [
        type(step) for step in inference_postprocessing(False, tmp_path)
    ]
    if crf:
        assert isinstance(steps[1], CRFRefined) and steps[1].iterations == 5
        assert steps[1].kernels == CRFKernels(1.0, 1.0, 1.5, 0.5, 3.0)


def test_with_crf_the_inference_chain_still_returns_labels_in_the_input_space(tmp_path: Path) -> None:
    """Preprocessing, made-up network scores, post-processing with the CRF: a label map on the
    input's own grid, as without it."""
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(phantom((20, 24, 18), np.random.default_rng(0))[0], PHANTOM_AFFINE), image)
    info = tmp_path / "dataset.json"
    info.write_text(json.dumps({"labels": LABELS, "modality": {"0": "MRI"}}))
    overrides = {"dataset_info": str(info), "input": [str(image)], "output_dir": str(tmp_path), "crf": True}
    parser = bundle_parser("unet3d", "inference", {**overrides, "save_predictions": False})
    case = parser.get_parsed_content("preprocessing")(parser.get_parsed_content("data")[0])
    case["pred"] = torch.randn(len(LABELS), *case["image"].shape[1:])
    labels = parser.get_parsed_content("postprocessing")(case)["pred"]
    assert labels.shape == (1, 20, 24, 18) and set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}
