"""Every bundle end to end through `python -m monai.bundle run`, on small real NIfTI files.

Train (2 epochs, MLflow tracking) -> resume -> inference -> evaluate, each as a user would run it,
with each network shrunk to a few channels so a CPU gets through all of them in about two minutes.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NETWORKS, tiny
from monai.bundle import ConfigParser, verify_net_in_out

import mlflow
from pipeline.data.datalist import cases
from pipeline.paths import volume_bundles
from pipeline.workflows import (
    BUNDLES_DIR,
    LOGGING_FILE,
    PROJECT_ROOT,
    available_bundles,
    config_files,
    evaluate,
    meta_files,
    train,
)


def relative(paths: list[str]) -> str:
    return str([str(Path(p).relative_to(PROJECT_ROOT)) for p in paths])


def monai_bundle_run(bundle: str, workflow: str, **settings: object) -> subprocess.CompletedProcess:
    """The command of the bundle's docs/README.md, with the test's settings appended."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--meta_file", relative(meta_files(bundle)),
        "--config_file", relative(config_files(bundle, workflow)),
        "--logging_file", str(LOGGING_FILE.relative_to(PROJECT_ROOT)),
        "--bundle_root", f"bundles/{bundle}",
    ]  # fmt: skip
    for key, value in {**tiny(bundle), **settings}.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=volume_bundles())  # unet2d: tests/test_unet2d.py
def trained(
    request: pytest.FixtureRequest, phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    bundle = request.param
    root = tmp_path_factory.mktemp(bundle)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    result = monai_bundle_run(
        bundle, "train", datalist=str(phantom_datalist), ckpt_dir=str(root / "models"), output_dir=str(root),
        max_epochs=2, tracking="mlflow", tracking_uri=uri, run_name=f"e2e-{bundle}",
    )  # fmt: skip
    return {"bundle": bundle, "root": root, "uri": uri, "log": result.stdout + result.stderr}


def test_every_bundle_is_tested() -> None:
    assert sorted(TINY_NETWORKS) == available_bundles()


@pytest.mark.parametrize("bundle", available_bundles())
def test_docs_give_the_commands_of_the_workflows(bundle: str) -> None:
    """The docs ask ``medseg config-files`` for the files, so they hold no installation's paths."""
    docs = (BUNDLES_DIR / bundle / "docs" / "README.md").read_text()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", docs, re.DOTALL))
    for workflow in ("train", "multi_gpu_train", "inference", "evaluate"):
        assert f"monai.bundle run $(medseg config-files {bundle} {workflow})" in commands, workflow
    assert "bundles/" not in commands and "--config_file" not in commands


@pytest.mark.parametrize("bundle", available_bundles())
def test_network_matches_its_metadata(bundle: str) -> None:
    """MONAI's own check: an input of the declared channels gives the declared output channels (the
    network shrunk and the 96^3 shape cut to the tiny patch, to keep the test quick)."""
    small = {"_meta_::network_data_format::inputs::image::spatial_shape": tiny(bundle)["patch_size"]}
    metadata = ConfigParser()
    metadata.read_meta(meta_files(bundle))
    classes = metadata["_meta_::network_data_format::outputs::pred::num_channels"]
    verify_net_in_out(
        net_id="network_def", meta_file=meta_files(bundle), config_file=config_files(bundle, "inference"),
        device="cpu", in_channels=1, num_classes=classes, **tiny(bundle), **small,
    )  # fmt: skip


def test_training_writes_checkpoints_and_reports_progress(trained: dict) -> None:
    models = trained["root"] / "models"
    assert {"model.pt", "latest.pt", "dataset.json"} <= {p.name for p in models.iterdir()}
    assert re.search(r"epoch 2/2  iter \d+/\d+  loss \d+\.\d+ .* left", trained["log"])


def test_training_metrics_are_in_the_mlflow_store(trained: dict) -> None:
    client = mlflow.tracking.MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("phantoms")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = 'e2e-{trained['bundle']}'"
    )
    assert run.info.status == "FINISHED"
    for metric in ("val_mean_dice", "val_mean_iou"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in history)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2


def test_rerunning_training_resumes_from_the_latest_checkpoint(trained: dict, phantom_datalist: Path) -> None:
    overrides = {**tiny(trained["bundle"]), "tracking_uri": trained["uri"]}
    train(trained["bundle"], phantom_datalist, trained["root"], epochs=3, overrides=overrides, plan=False)
    latest = torch.load(trained["root"] / "models" / "latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == 3 * latest["trainer"]["epoch_length"]


def test_inference_writes_segmentations_in_the_input_space(trained: dict, phantom_datalist: Path) -> None:
    out = trained["root"] / "predictions"
    images = [c["image"] for c in cases(phantom_datalist, role="test")]
    monai_bundle_run(
        trained["bundle"], "inference", input=str(images), output_dir=str(out),
        checkpoint=str(trained["root"] / "models" / "model.pt"),
    )  # fmt: skip
    for image in images:
        source = nib.load(image)
        prediction = nib.load(out / f"{Path(image).name.removesuffix('.nii.gz')}_seg.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}


def test_evaluate_writes_the_report_with_and_without_postprocessing(
    trained: dict, phantom_datalist: Path
) -> None:
    root = trained["root"]
    overrides = {
        **tiny(trained["bundle"]),
        "tracking_uri": trained["uri"],
        "run_name": f"e2e-{trained['bundle']}-evaluate",
        "min_component_mm3": 50,
        "keep_largest_component_classes": ["organ"],
    }
    out = evaluate(
        trained["bundle"],
        phantom_datalist,
        root / "evaluation",
        root / "models" / "model.pt",
        "validation",
        overrides,
    )
    validation = sorted(
        Path(c["image"]).name.removesuffix(".nii.gz") for c in cases(phantom_datalist, role="validation")
    )
    scores = {f"{m}_{c}" for m in ("dice", "iou", "hd95", "asd") for c in ("organ", "core", "mean")}
    volumes = {f"{v}_{c}" for v in ("pred_ml", "gt_ml") for c in ("organ", "core")}
    for table in ("per_case.csv", "per_case_argmax.csv"):
        with (out / table).open() as handle:
            rows = list(csv.DictReader(handle))
        assert [r["case"] for r in rows] == validation
        for row in rows:
            assert set(row) == {"case"} | scores | volumes
            assert all(
                0.0 <= float(row[f"{m}_{c}"]) <= 1.0 for m in ("dice", "iou") for c in ("organ", "core")
            )
            assert all(float(row[key]) >= 0.0 for key in (*volumes, "hd95_mean", "asd_mean"))
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["variants"]) == ["postprocessed", "argmax"]
    assert summary["postprocessing"]["keep_largest_component_classes"] == ["organ"]
    assert {"mean_dice", "mean_iou"} <= set((out / "metrics.csv").read_text().replace(",", "\n").split())
    assert "data:image/png;base64," in (out / "report.html").read_text()

    client = mlflow.tracking.MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("phantoms")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = 'e2e-{trained['bundle']}-evaluate'"
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_case.csv", "per_case_argmax.csv", "metrics.json", "report.html"} <= artifacts
    assert {"dice_organ", "hd95_mean", "argmax_dice_mean", "mean_dice"} <= set(run.data.metrics)
    assert run.data.params["min_component_mm3"] == "50"
