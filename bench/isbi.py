"""The original U-Net's task: unet2d on the ISBI 2012 EM stack (``../shared/data/isbi2012_em``).

A fixed split (seed 0): 10 of the 30 labelled 512x512 slices held out, the other 20 train (fold 0 of
5 validates). ``medseg train unet2d --minutes 15`` plans and trains as a user's run would; ``medseg
evaluate`` segments the held-out slices without and with the CRF. Scores on the held-out slices:
pixel error, the challenge's foreground-restricted Rand error (stack of the 10 slices), membrane
Dice and IoU (membranes are the label's 0 pixels: the background class here, whose cells are class 1)
and cell Dice; and an overlay picture of one slice. The paper's figures on the hidden test stack:
Rand error 0.0382, warping error 0.000353.

    .venv/bin/python -m bench.isbi [--minutes 15] [--fresh]

Writes ``bench/isbi.json`` and prints a table; run folders under ``data/cache/bench-isbi``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image

from bench import machine
from bench.accuracy import ROOT, run_logged, say, tracking_args
from pipeline.data.build import build_datalist
from pipeline.data.datalist import cases
from pipeline.evaluation.metrics import pixel_error, rand_error
from pipeline.io.atomic import atomic_write

ISBI = ROOT.parent / "shared" / "data" / "isbi2012_em"
WORK = ROOT / "data" / "cache" / "bench-isbi"
HELD_OUT = 10
PAPER = {"rand_error": 0.0382, "warping_error": 0.000353}
VARIANTS = {"argmax": ["crf=false"], "crf": ["crf=true"]}


def split_datalist(data: Path, work: Path, seed: int) -> Path:
    """``medseg datalist``'s datalist of the stack, with ``HELD_OUT`` seeded slices moved to a labelled
    test list (the evaluation's ``--split test``)."""
    datalist = build_datalist(data, work / "datalist.json", folds=5, seed=seed)
    content = json.loads(datalist.read_text())
    training = sorted(content["training"], key=lambda entry: entry["image"])
    held = set(random.Random(seed).sample(range(len(training)), HELD_OUT))
    content["test"] = [
        {k: v for k, v in e.items() if k != "fold"} for i, e in enumerate(training) if i in held
    ]
    content["training"] = [entry for index, entry in enumerate(training) if index not in held]
    content["labels"] = {"0": "membrane", "1": "cell"}  # 0 pixels: membranes; 255: cell interiors
    content["modality"] = {"0": "EM"}
    with atomic_write(datalist) as handle:
        handle.write((json.dumps(content, indent=2) + "\n").encode())
    return datalist


def read_mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0  # cells True, membranes False


def scores(datalist: Path, predictions: Path) -> dict[str, float]:
    """The held-out slices' figures from the written segmentations (``<slice>_seg.png``)."""
    truth, pred = [], []
    for case in cases(datalist, role="test"):
        name = Path(case["image"]).stem
        truth.append(read_mask(Path(case["label"])))
        pred.append(read_mask(predictions / f"{name}_seg.png"))
    truth_stack, pred_stack = np.stack(truth, axis=-1), np.stack(pred, axis=-1)

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)

    membrane_pred, membrane_truth = ~pred_stack, ~truth_stack
    union = np.count_nonzero(membrane_pred | membrane_truth)
    return {
        "pixel_error": round(pixel_error(pred_stack, truth_stack), 4),
        "rand_error": round(rand_error(membrane_pred, membrane_truth), 4),
        "membrane_dice": round(dice(membrane_pred, membrane_truth), 4),
        "membrane_iou": round(np.count_nonzero(membrane_pred & membrane_truth) / max(union, 1), 4),
        "cell_dice": round(dice(pred_stack, truth_stack), 4),
    }


def overlay(datalist: Path, predictions: Path, out: Path) -> Path:
    """The first held-out slice, its truth's membranes in green and the prediction's in magenta."""
    case = cases(datalist, role="test")[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case["image"]))).astype(np.float32)
    grey = np.repeat(((image - image.min()) / max(np.ptp(image), 1) * 255)[..., None], 3, axis=-1)
    truth = ~read_mask(Path(case["label"]))
    pred = ~read_mask(predictions / f"{Path(case['image']).stem}_seg.png")
    picture = np.concatenate([grey, grey.copy()], axis=1)
    width = grey.shape[1]
    picture[:, :width][truth] = 0.5 * picture[:, :width][truth] + [0, 127, 0]
    picture[:, width:][pred] = 0.5 * picture[:, width:][pred] + [127, 0, 127]
    with atomic_write(out) as handle:
        Image.fromarray(picture.astype(np.uint8)).save(handle, format="png")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="train again even if a model is there")
    parser.add_argument("--data", type=Path, default=ISBI)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "isbi.json")
    args = parser.parse_args(argv)
    if not (args.data / "image").is_dir():
        raise SystemExit(f"bench-isbi: {args.data} not found (the shared ISBI 2012 stack)")
    run = args.work / "unet2d"
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    datalist = split_datalist(args.data, args.work, args.seed)
    tracking = tracking_args(args.work)
    medseg = [sys.executable, "-m", "pipeline.cli"]
    model = run / "models" / "model.pt"
    test = [Path(case["image"]).name for case in cases(datalist, role="test")]
    results: dict[str, Any] = {"machine": machine.describe(512), "minutes": args.minutes, "seed": args.seed,
                               "paper": PAPER, "test": test}  # fmt: skip
    if not model.is_file():
        say(f"isbi unet2d: training {args.minutes} min, log in {run}")
        command = [*medseg, "train", "unet2d", "--data", str(datalist), "--output", str(run),
                   "--minutes", str(args.minutes), *tracking]  # fmt: skip
        results["train_min"] = round(run_logged(command, run / "train.log", args.work), 2)
    for variant, overrides in VARIANTS.items():
        out = run / f"eval_{variant}"
        say(f"isbi unet2d: evaluating the held-out slices ({variant})")
        command = [*medseg, "evaluate", "unet2d", "--data", str(datalist), "--split", "test",
                   "--checkpoint", str(model), "--output", str(out), *tracking, *overrides]  # fmt: skip
        run_logged(command, run / f"evaluate_{variant}.log", args.work)
        results[variant] = scores(datalist, out)
    results["overlay"] = str(overlay(datalist, run / "eval_argmax", run / "overlay.png").relative_to(ROOT))
    with atomic_write(args.out) as handle:
        handle.write((json.dumps(results, indent=2) + "\n").encode())
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    keys = ("pixel_error", "rand_error", "membrane_dice", "membrane_iou", "cell_dice")
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(f"{results[variant][k]:.4f}" for k in keys) + " |")
    lines.append(f"paper (hidden test stack): Rand error {PAPER['rand_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
