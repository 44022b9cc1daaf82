"""Overlap-tile inference of one large 2D image (whole-slide or mosaic microscopy): ``unet2d`` at its
own width on a 4096x4096 PNG, in a fresh process, for its peak memory (issue 18: under 2 GiB on 2 CPU
cores) and its time (``--sample-calls`` batches of windows timed for real, the rest extrapolated, as
``bench/run.py`` does), with the image mirrored at its borders as the bundle's inference does.

    .venv/bin/python -m bench.large_image [--size 4096]

``make bench`` runs it after the volume bundles (``bench/results.json``, key ``large_image``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from bench.isolated import in_fresh_process
from bench.ours import seeded_checkpoint
from pipeline.data.build import build_datalist

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "cache" / "bench"


def write_image(folder: Path, size: int, seed: int = 0) -> Path:
    """A micrograph-like PNG of ``size`` x ``size`` pixels: bright discs on a noisy background."""
    path = folder / f"mosaic_{size}.png"
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    rows, columns = np.ogrid[:size, :size]
    image = rng.normal(60, 12, size=(size, size)).astype(np.float32)
    for centre in rng.uniform(0, size, size=(size // 64, 2)):
        image[(rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < 20**2] += 120
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(path))
    return path


def labelled_folder(folder: Path) -> Path:
    """Two small labelled PNGs: the dataset facts a seeded checkpoint is saved with (channels, labels)."""
    for kind in ("images", "labels"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for index in range(2):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16 + index : 40] = 255
        sitk.WriteImage(sitk.GetImageFromArray(mask // 2), str(folder / "images" / f"c{index}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "labels" / f"c{index}.png"))
    return build_datalist(folder, folder / "datalist.json", folds=2)


def large_image(size: int = 4096, sample_calls: int = 2, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    image = write_image(data_dir, size)
    with tempfile.TemporaryDirectory(prefix="bench-large-") as work:
        root = Path(work)
        datalist = labelled_folder(root / "facts")
        checkpoint = seeded_checkpoint("unet2d", datalist, root / "models", {})
        spec = {"side": "ours", "bundle": "unet2d", "images": [str(image)], "output_dir": str(root / "out"),
                "checkpoint": str(checkpoint), "sample_calls": sample_calls, "overrides": {}}  # fmt: skip
        result = in_fresh_process(spec)
        written = sitk.ReadImage(str(root / "out" / f"{image.stem}_seg.png"))
        result["output_size"] = list(written.GetSize())
    return {"image": f"{size}x{size} PNG", **result}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sample-calls", type=int, default=2)
    args = parser.parse_args(argv)
    result = large_image(args.size, args.sample_calls)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
