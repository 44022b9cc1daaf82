"""2D against 3D on thick slices (issue 18): unet3d in 3D and slice-wise, on 5 mm slices.

nnU-Net's 2D configuration often wins on thick-slice CT/MRI. The shared data holds one labelled CT,
which cannot give a held-out measurement, so the thick-slice volumes are made from the shared MSD
hippocampus cases (1 mm MRI): each image and label is resampled to 5 mm along its third axis
(linear for the image, nearest for the label), which leaves 7-8 slices across the structure, written
under ``data/cache/bench-thick`` (derived files in the git-ignored cache; nothing shared is copied).
On bench.accuracy's seeded split, two arms at one budget, each as a user would type it:

* ``planned``: ``medseg train unet3d --data split.json --minutes M`` (the plan stays 3D, and says
  whether it recommends 2D);
* ``planned+slice-wise``: the same with ``spatial_dims=2``: the plan makes it a 2D network on the
  slices across the coarsest axis, applied slice by slice and stacked back into the volume;

then ``medseg evaluate unet3d --split test`` on the held-out cases, at their 5 mm grid.

    .venv/bin/python -m bench.thick_slices [--minutes 5] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from bench import machine
from bench.accuracy import HIPPOCAMPUS, ROOT, Arm, hippocampus_split, run_arm, say, table
from pipeline.io.atomic import atomic_path, atomic_write

WORK = ROOT / "data" / "cache" / "bench-thick"
SLICE_MM = 5.0
ARMS = {"planned": {}, "planned+slice-wise": {"spatial_dims": 2}}


def thick(source: str, target: Path, interpolator: int) -> str:
    """``source`` resampled to ``SLICE_MM`` along its third axis, on the same extent and directions."""
    if not target.is_file():
        image = sitk.ReadImage(source)
        spacing = (*image.GetSpacing()[:2], SLICE_MM)
        size = [*image.GetSize()[:2], max(1, round(image.GetSize()[2] * image.GetSpacing()[2] / SLICE_MM))]
        resampled = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                                  image.GetDirection(), 0, image.GetPixelID())  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, keep_suffix=True) as tmp:
            sitk.WriteImage(resampled, str(tmp))
    return str(target)


def thick_split(seed: int, num_test: int, work: Path) -> Path:
    """bench.accuracy's hippocampus split with every case replaced by its thick-slice version."""
    split = hippocampus_split(HIPPOCAMPUS, seed, num_test, None)
    for entry in (*split["training"], *split["test"]):
        name = Path(entry["image"]).name
        entry["image"] = thick(entry["image"], work / "images" / name, sitk.sitkLinear)
        entry["label"] = thick(entry["label"], work / "labels" / name, sitk.sitkNearestNeighbor)
    split["description"] = f"{split['description']}, resampled to {SLICE_MM:g} mm slices"
    path = work / "split.json"
    with atomic_write(path) as handle:
        handle.write((json.dumps(split, indent=2) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--fresh", action="store_true", help="train the arms again")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "thick_slices.json")
    args = parser.parse_args(argv)
    if not HIPPOCAMPUS.is_file():
        raise SystemExit(f"bench-thick: {HIPPOCAMPUS} not found (the shared MSD hippocampus cases)")
    runs = args.work / "runs"
    if args.fresh:
        shutil.rmtree(runs, ignore_errors=True)
    say(f"thick slices: resampling the hippocampus cases to {SLICE_MM:g} mm under {args.work}")
    datalist = thick_split(args.seed, args.test_cases, args.work)
    rows = [
        run_arm(
            Arm("hippocampus-5mm", "unet3d", name, datalist, runs / name, overrides), args.minutes, args.work
        )
        for name, overrides in ARMS.items()
    ]
    results = {"machine": machine.describe(512), "minutes": args.minutes, "slice_mm": SLICE_MM, "rows": rows}
    with atomic_write(args.out) as handle:
        handle.write((json.dumps(results, indent=2) + "\n").encode())
    print(table(rows, "hippocampus-5mm"))
    return results


if __name__ == "__main__":
    main()
