"""How cost grows: inference time against volume size, training-cache memory against cases."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import ours
from bench.volumes import write_case, write_datalist
from pipeline.bundle_parser import bundle_parser


def inference_scaling(bundle: str, args: argparse.Namespace, overrides: dict, checkpoint: Path) -> list[dict]:
    """Ours (extrapolated like the main figure) on volumes of the same slice size and more slices."""
    rows = []
    width, height, _ = args.volume
    for slices in args.scaling_slices:
        case = write_case(args.data_dir, f"ct_{width}x{height}x{slices}", (width, height, slices))
        out = args.work / "scaling" / str(slices)
        wall, sampled = ours.inference(bundle, [case["image"]], out, checkpoint, args.sample_calls, overrides)
        seconds = sampled.total_seconds(wall)
        megavoxels = width * height * slices / 1e6
        row = {"shape": [width, height, slices], "windows": sampled.windows, "inference_s": round(seconds, 2)}
        rows.append({**row, "s_per_megavoxel": round(seconds / megavoxels, 4)})
    return rows


def cached_bytes(dataset: torch.utils.data.Dataset) -> int:
    total = 0
    for item in getattr(dataset, "_cache", []):
        for value in item.values() if isinstance(item, dict) else []:
            total += value.nbytes if isinstance(value, torch.Tensor) else 0
    return total


def cache_scaling(bundle: str, args: argparse.Namespace, overrides: dict) -> list[dict]:
    """Bytes the train config's CacheDataset holds for 1, 2, 4 ... training cases."""
    rows = []
    for count in args.cache_cases:
        datalist = write_datalist(args.data_dir, args.train_volume, 2 * count)  # every other case validates
        parser = bundle_parser(bundle, "train", {**overrides, "datalist": str(datalist)})
        dataset = parser.get_parsed_content("train::dataset")
        rows.append({"cases": len(dataset), "cache_mib": round(cached_bytes(dataset) / 2**20, 1)})
    return rows


def scaling(bundle: str, args: argparse.Namespace, overrides: dict, checkpoint: Path) -> dict:
    return {
        "bundle": bundle,
        "inference": inference_scaling(bundle, args, overrides, checkpoint),
        "cache": cache_scaling(bundle, args, overrides),
    }
