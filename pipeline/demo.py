"""``make demo``: the whole pipeline once on the real sample dataset, sized for a 2-core CPU.

Prepare the MNI152 brain-tissue cases, train the 3D U-Net bundle, segment the held-out test
cases into their own space, score them, draw one overlay, and say where everything is.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.datalist import cases, label_names
from pipeline.data.mni_brain import prepare
from pipeline.evaluation import read_metric_means
from pipeline.tracking import PROJECT_ROOT, default_tracking_uri
from pipeline.visualisation import save_overlay
from pipeline.workflows import evaluate, infer, train

BUNDLE = "unet3d"
DATA_DIR = PROJECT_ROOT / "data"
# Smaller than the bundle's defaults so that training fits in a few CPU minutes: 2 mm voxels,
# a slab-shaped patch (the cases are ~26 mm thick slabs) and a quarter of the channels.
DEMO_SETTINGS = {
    "spacing": [2.0, 2.0, 2.0],
    "patch_size": [48, 48, 16],
    "features": [16, 32, 64, 128, 256, 16],
    "batch_size": 2,
    "samples_per_volume": 2,
    "learning_rate": 3.0e-3,
    "warmup_epochs": 1,
    "val_interval": 5,
    "num_workers": 0,
}
DEMO_EPOCHS = 40


def run_demo(output_dir: Path, epochs: int | None = None) -> dict[str, float]:
    """Run every stage; returns the test-set metric means."""
    started = time.perf_counter()
    output_dir = output_dir.resolve()
    datalist = prepare(DATA_DIR / "mni_brain", DATA_DIR / "cache")
    models = train(BUNDLE, datalist, output_dir / "train", epochs or DEMO_EPOCHS, DEMO_SETTINGS)
    checkpoint = models / "model.pt"
    test_cases = cases(datalist, role="test")
    predictions = infer(
        BUNDLE, [c["image"] for c in test_cases], output_dir / "predictions", checkpoint, DEMO_SETTINGS
    )
    evaluation = evaluate(BUNDLE, datalist, output_dir / "evaluation", checkpoint, "test", DEMO_SETTINGS)
    first = test_cases[0]
    overlay = save_overlay(
        first["image"],
        predictions / f"{case_name(first['image'])}_seg.nii.gz",
        output_dir / "overlay.png",
        label=first["label"],
        label_names=label_names(datalist),
        title=f"{BUNDLE} on held-out case {case_name(first['image'])}",
    )
    means = read_metric_means(evaluation)
    print_summary(
        output_dir, datalist, predictions, evaluation, overlay, means, time.perf_counter() - started
    )
    return means


def case_name(image: str | Path) -> str:
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def print_summary(
    output_dir: Path,
    datalist: Path,
    predictions: Path,
    evaluation: Path,
    overlay: Path,
    means: dict[str, float],
    seconds: float,
) -> None:
    rows = [
        ("dataset", datalist),
        ("checkpoints", output_dir / "train" / "models"),
        ("segmentations", predictions),
        ("per-case metrics", evaluation),
        ("overlay", overlay),
        ("MLflow store", default_tracking_uri()),
    ]
    print("\n" + "=" * 72)
    print(f"demo finished in {seconds / 60:.1f} min; held-out test cases:")
    for name, value in means.items():
        print(f"  {name:<12} {value:.4f}")
    for name, path in rows:
        print(f"  {name:<17} {path}")
    print(f"open the MLflow UI: make mlflow-ui  (then browse http://127.0.0.1:5000, from {PROJECT_ROOT})")
    print("=" * 72)
