"""ONNX Runtime and OpenVINO against PyTorch: the same softmax within 1e-4 for every bundle's network,
the export cached under a key that changes with the weights and the window, the fallback to PyTorch
when a runtime disagrees, and a whole inference run on each runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny
from model_factory import network, untrained_model

from pipeline.cli import main
from pipeline.export import export_onnx
from pipeline.inference import runtimes
from pipeline.inference.runtimes import RuntimeNetwork, resolve_runtime
from pipeline.io.checkpoint import load_network_weights
from pipeline.paths import available_bundles
from pipeline.workflows import infer

pytest.importorskip("onnxruntime", reason="the onnxruntime package is not installed")
pytest.importorskip("openvino", reason="the openvino package is not installed")

CPU_RUNTIMES = ("onnxruntime", "openvino")


def window_batch(bundle: str, channels: int, count: int = 3) -> torch.Tensor:
    patch = tiny(bundle)["patch_size"]
    return torch.randn((count, channels, *patch), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bundle", available_bundles())
def test_every_bundle_agrees_with_pytorch_or_runs_on_pytorch(
    bundle: str, phantom_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime used is within 1e-4 of PyTorch's softmax on windows other than the one it was checked
    on; one that is not used leaves PyTorch's output untouched. ONNX Runtime agrees on every network
    (OpenVINO's instance normalisation drifts by 3e-4 on the tiny MultiResUNet's 2^3 deepest level)."""
    monkeypatch.setattr(runtimes, "USER_CACHE", tmp_path)  # no checkpoint file: exports go there
    torch.manual_seed(0)
    model = network(bundle, phantom_datalist).eval()
    windows = window_batch(bundle, 1)  # three windows: more than the export's example of one
    with torch.no_grad():
        logits = model(windows)
    used = []
    for runtime in CPU_RUNTIMES:
        wrapped = RuntimeNetwork(model, runtime, None)
        with torch.no_grad():
            found = wrapped(windows)
        assert found.shape == logits.shape
        if wrapped._runs[tuple(windows.shape[1:])] is None:
            assert torch.equal(found, logits), f"{runtime} fell back, yet not to PyTorch's output"
            continue
        used.append(runtime)
        difference = float((torch.softmax(found, 1) - torch.softmax(logits, 1)).abs().max())
        assert difference <= runtimes.TOLERANCE, f"{runtime}: {difference:.1e}"
    assert "onnxruntime" in used


def test_the_export_is_cached_beside_the_checkpoint_and_keyed_by_weights_and_window(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    checkpoint = untrained_model("resunet", phantom_datalist, tmp_path / "models")
    model = network("resunet", phantom_datalist).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    wrapped = RuntimeNetwork(model, "onnxruntime", checkpoint)
    wrapped(window_batch("resunet", 1, 2))
    exports = sorted((tmp_path / "models" / "onnx").glob("*.onnx"))
    assert len(exports) == 1
    facts = runtimes.read_facts(exports[0])
    assert facts["input"]["shape"][1:] == [1, 32, 32, 32]
    assert facts["softmax_difference"]["onnxruntime"] <= runtimes.TOLERANCE
    RuntimeNetwork(model, "onnxruntime", checkpoint)(window_batch("resunet", 1, 1))
    assert len(list((tmp_path / "models" / "onnx").glob("*.onnx"))) == 1  # reused, not exported again
    RuntimeNetwork(model, "onnxruntime", checkpoint)(torch.randn(1, 1, 32, 32, 48))
    assert len(list((tmp_path / "models" / "onnx").glob("*.onnx"))) == 2  # another window: another file
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, checkpoint)
    assert runtimes.export_name(model, checkpoint, (1, 32, 32, 32)) != exports[0].name


def test_a_runtime_that_disagrees_gives_way_to_pytorch(
    phantom_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtimes, "TOLERANCE", 0.0)  # any rounding difference is now a disagreement
    monkeypatch.setattr(runtimes, "USER_CACHE", tmp_path)
    model = network("unet3d", phantom_datalist).eval()
    windows = window_batch("unet3d", 1, 1)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        found = RuntimeNetwork(model, "openvino", None)(windows)
        expected = model(windows)
    assert torch.equal(found, expected)
    assert "go through PyTorch" in caplog.text


def test_auto_is_the_bundle_cpu_choice_and_pytorch_on_a_gpu() -> None:
    assert resolve_runtime("auto", "cpu", "openvino") == "openvino"
    assert resolve_runtime("auto", "cuda:0", "openvino") == "torch"
    assert resolve_runtime("onnxruntime", "cuda:0", "torch") == "torch"
    assert resolve_runtime("torch", "cpu", "openvino") == "torch"
    with pytest.raises(ValueError, match="tensorrt"):
        resolve_runtime("tensorrt", "cpu")


def test_inference_on_each_runtime_writes_the_same_segmentation(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    settings = tiny("resunet")
    checkpoint = untrained_model("resunet", phantom_datalist, tmp_path / "models")
    (image,) = sorted((phantom_datalist.parent / "imagesTs").glob("*.nii.gz"))
    outputs = {}
    for runtime in ("torch", *CPU_RUNTIMES):
        out = infer(
            "resunet",
            [image],
            tmp_path / runtime,
            checkpoint,
            {**settings, "runtime": runtime},
            tracking=False,
        )
        (written,) = sorted(Path(out).glob("*_seg.nii.gz"))
        outputs[runtime] = nib.load(written)
    reference = np.asarray(outputs["torch"].dataobj)
    for runtime in CPU_RUNTIMES:
        assert np.allclose(outputs[runtime].affine, outputs["torch"].affine)
        agreement = float((np.asarray(outputs[runtime].dataobj) == reference).mean())
        assert agreement > 0.999, f"{runtime}: {agreement:.4f} of the voxels agree with PyTorch's"
    assert list((tmp_path / "models" / "onnx").glob("*.onnx"))


def test_export_onnx_writes_a_file_a_deployment_can_run_alone(
    tiny_unet3d_checkpoint: Path, tmp_path: Path
) -> None:
    import onnx

    out = tmp_path / "unet3d.onnx"
    assert main(["export-onnx", "unet3d", str(tiny_unet3d_checkpoint), str(out)]) in (0, None)
    described = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["medseg"])
    assert described["labels"] == {"0": "background", "1": "organ", "2": "core"}
    assert described["input"]["shape"] == ["windows", 1, 32, 32, 32]  # the tiny training's patch
    assert described["preprocessing"]["spacing_mm"] == [2.0, 2.0, 2.0]
    model = network("unet3d", tiny_unet3d_checkpoint.parent / "dataset.json")
    windows = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(load_network_weights(model, tiny_unet3d_checkpoint).eval()(windows), 1)
    found = torch.softmax(torch.from_numpy(runtimes.session("onnxruntime", out)(windows.numpy())), 1)
    assert float((found - expected).abs().max()) <= runtimes.TOLERANCE
    with pytest.raises(FileExistsError, match="exists"):
        export_onnx("unet3d", tiny_unet3d_checkpoint, out)


def test_windows_one_at_a_time_give_the_batch_result(
    phantom_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtimes, "USER_CACHE", tmp_path)
    model = network("attention_unet", phantom_datalist).eval()
    windows = window_batch("attention_unet", 1, 3)
    with torch.no_grad():
        batched = RuntimeNetwork(model, "openvino")(windows)
        single = RuntimeNetwork(model, "openvino", windows_per_call=1)(windows)
    assert single.shape == batched.shape == (3, 3, 32, 32, 32)
    assert float((torch.softmax(single, 1) - torch.softmax(batched, 1)).abs().max()) <= runtimes.TOLERANCE


def test_no_worker_is_forked_after_an_onnx_runtime_ran_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers forked after OpenVINO's or ONNX Runtime's thread pools started crashed this test suite."""
    import sys

    from pipeline.training.distributed import fork_safe_workers

    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    assert fork_safe_workers(3) == 3
    monkeypatch.setitem(sys.modules, "onnxruntime", runtimes)
    assert fork_safe_workers(3) == 0
