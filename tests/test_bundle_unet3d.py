"""The 3D U-Net bundle end to end through `python -m monai.bundle run`, on small real NIfTI files.

Train (2 epochs, MLflow tracking) -> resume -> inference -> evaluate, each as a user would run it.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mlflow
from pipeline.data.datalist import cases
from pipeline.workflows import BUNDLES_DIR, PROJECT_ROOT, config_files, evaluate, train

BUNDLE = "unet3d"
TINY = {
    "features": "[4,8,16,32,64,4]",
    "patch_size": "[32,32,32]",
    "spacing": "[2.0,2.0,2.0]",
    "num_workers": "0",
    "sw_batch_size": "2",
}


def monai_bundle_run(workflow: str, **settings: str) -> subprocess.CompletedProcess:
    """The command of the bundle's docs/README.md, with the test's settings appended."""
    relative = [str(Path(f).relative_to(PROJECT_ROOT)) for f in config_files(BUNDLE, workflow)]
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--meta_file",
        f"bundles/{BUNDLE}/configs/metadata.json",
        "--config_file",
        str(relative),
        "--logging_file",
        "bundles/common/logging.conf",
        "--bundle_root",
        f"bundles/{BUNDLE}",
    ]
    for key, value in {**TINY, **settings}.items():
        command += [f"--{key}", value]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(phantom_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unet3d")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    result = monai_bundle_run(
        "train",
        datalist=str(phantom_datalist),
        ckpt_dir=str(root / "models"),
        output_dir=str(root),
        max_epochs="2",
        tracking="mlflow",
        tracking_uri=uri,
        run_name="e2e-train",
    )
    return {"root": root, "uri": uri, "log": result.stdout + result.stderr}


def test_docs_give_the_same_config_lists_as_the_workflows() -> None:
    docs = (BUNDLES_DIR / BUNDLE / "docs" / "README.md").read_text()
    for workflow in ("train", "inference", "evaluate"):
        relative = [str(Path(f).relative_to(PROJECT_ROOT)) for f in config_files(BUNDLE, workflow)]
        assert str(relative).replace(" ", "").replace('"', "'") in docs.replace(" ", "")


def test_training_writes_checkpoints_and_reports_progress(trained: dict) -> None:
    models = trained["root"] / "models"
    assert {"model.pt", "latest.pt", "dataset.json"} <= {p.name for p in models.iterdir()}
    assert re.search(r"epoch 2/2  iter \d+/\d+  loss \d+\.\d+ .* left", trained["log"])


def test_training_metrics_are_in_the_mlflow_store(trained: dict) -> None:
    client = mlflow.tracking.MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("phantoms")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'e2e-train'")
    assert run.info.status == "FINISHED"
    for metric in ("val_mean_dice", "val_mean_iou"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in history)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2


def test_rerunning_training_resumes_from_the_latest_checkpoint(trained: dict, phantom_datalist: Path) -> None:
    overrides = {key: eval(value) for key, value in TINY.items()}  # the same settings, as Python values
    overrides["tracking_uri"] = trained["uri"]
    train(BUNDLE, phantom_datalist, trained["root"], epochs=3, overrides=overrides)
    import torch

    latest = torch.load(trained["root"] / "models" / "latest.pt", weights_only=True)
    iterations_per_epoch = latest["trainer"]["epoch_length"]
    assert latest["trainer"]["iteration"] == 3 * iterations_per_epoch


def test_inference_writes_segmentations_in_the_input_space(trained: dict, phantom_datalist: Path) -> None:
    out = trained["root"] / "predictions"
    images = [c["image"] for c in cases(phantom_datalist, role="test")]
    monai_bundle_run(
        "inference",
        input=str(images),
        output_dir=str(out),
        checkpoint=str(trained["root"] / "models" / "model.pt"),
    )
    for image in images:
        source = nib.load(image)
        name = Path(image).name.removesuffix(".nii.gz")
        prediction = nib.load(out / f"{name}_seg.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}


def test_evaluate_writes_per_case_dice_and_iou(trained: dict, phantom_datalist: Path) -> None:
    out = evaluate(
        BUNDLE,
        phantom_datalist,
        trained["root"] / "evaluation",
        trained["root"] / "models" / "model.pt",
        split="validation",
        overrides={**{key: eval(value) for key, value in TINY.items()}, "tracking_uri": trained["uri"]},
    )
    validation = cases(phantom_datalist, role="validation")
    for metric in ("mean_dice", "mean_iou"):
        with (out / f"{metric}_raw.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert sorted(Path(r["filename"]).name for r in rows) == sorted(
            Path(c["image"]).name for c in validation
        )
        assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
        assert {"class0", "class1"} <= set(rows[0]), "one column per foreground class"
    assert {"mean_dice", "mean_iou"} <= set((out / "metrics.csv").read_text().replace(",", "\n").split())
