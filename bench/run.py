"""``make bench``: ours against the model-zoo way, per bundle, on CT-sized volumes; writes
``bench/results.json`` and prints a markdown table.

Full-size networks take seconds per 96^3 window on a CPU, so each inference times
``--sample-calls`` batches of windows for real and extrapolates the network's share to every window
(the rest of the pipeline runs in full; see ``bench/sampling.py``). Training times iterations of
``--train-patches`` patches for about ``--train-seconds`` after one warm-up. ``--nnunet`` adds
nnU-Net v2 (3d_fullres, no TTA, CPU) on the same volume, timed the same way (``bench/nnunet.py``).

    .venv/bin/python -m bench.run [--bundles unet3d resunet] [--quick] [--checkpoints outputs/compare-demo]
                                  [--nnunet]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import torch

from bench import baseline, machine, nnunet, ours
from bench.isolated import in_fresh_process
from bench.large_image import large_image
from bench.measure import dice, segmentation_of, training_seconds, window_flops
from bench.scaling import scaling
from bench.volumes import write_case, write_datalist
from pipeline.data.datalist import cases
from pipeline.paths import volume_bundles

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR.parent / "data" / "cache" / "bench"  # git-ignored; volumes are reused between runs
DICE_DATALIST = BENCH_DIR.parent / "data" / "mni_brain" / "datalist.json"
FULL = {"volume": (512, 512, 300), "train_volume": (512, 512, 64), "overrides": {}}
QUICK_NETWORKS = {
    "unet3d": {"features": [4, 8, 16, 32, 64]},
    "resunet": {"channels": [4, 8, 16, 32, 64]},
    "attention_unet": {"channels": [4, 8, 16, 32, 64]},
    "unetr": {"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
    "multiresunet": {"features": [4, 8, 16, 32, 64]},
}
QUICK = {
    "volume": (64, 64, 24),
    "train_volume": (64, 64, 24),
    "overrides": {
        "patch_size": [32, 32, 32],
        "spacing": [2.0, 2.0, 2.0],
        "num_workers": 0,
        "sw_batch_size": 2,
    },
}


def bundle_overrides(bundle: str, quick: bool) -> dict:
    return {**QUICK["overrides"], **QUICK_NETWORKS[bundle]} if quick else {}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def inference_pair(bundle: str, args: argparse.Namespace, image: str, work: Path, overrides: dict) -> dict:
    """Ours and the baseline on the same volume with the same seeded weights, each in a fresh process."""
    checkpoint = ours.seeded_checkpoint(bundle, args.datalist, work / "models", overrides)
    network, settings = ours.build_network(bundle, checkpoint, overrides)
    spec = {"bundle": bundle, "images": [image], "checkpoint": str(checkpoint), "overrides": overrides,
            "sample_calls": args.sample_calls}  # fmt: skip
    mine = in_fresh_process({**spec, "side": "ours", "output_dir": str(work / "ours")})
    base = in_fresh_process({**spec, "side": "baseline", "output_dir": str(work / "baseline")})
    flops = window_flops(network, settings["patch_size"])
    rate = flops / mine["seconds_per_window"] / 1e9 if mine["seconds_per_window"] else None
    settings["num_workers"] = overrides.get("num_workers", baseline.NUM_WORKERS)
    return {
        "inference_s_ours": round(mine["seconds"], 2),
        "inference_s_baseline": round(base["seconds"], 2),
        "inference_speedup": ratio(base["seconds"], mine["seconds"]),
        "windows_ours": mine["windows"],
        "windows_baseline": base["windows"],
        "inference_extrapolated": mine["extrapolated"] or base["extrapolated"],
        "voxels_per_s_ours": round(voxels(image) / mine["seconds"]),
        "voxels_per_s_baseline": round(voxels(image) / base["seconds"]),
        "forward_gflop_per_window": round(flops / 1e9, 2),
        "forward_s_per_window": round(mine["seconds_per_window"], 3),
        "forward_s_per_window_baseline": round(base["seconds_per_window"], 3),
        "forward_fraction_of_peak": round(rate / args.machine["matmul_gflops"], 3) if rate else None,
        "peak_mem_gib": round(mine["peak_mem_gib"], 2),
        "peak_mem_gib_baseline": round(base["peak_mem_gib"], 2),
        "_settings": settings,
    }


def voxels(image: str) -> int:
    shape = nib.load(image).shape
    return int(shape[0] * shape[1] * shape[2])


def training_pair(bundle: str, args: argparse.Namespace, work: Path, overrides: dict, settings: dict) -> dict:
    """Seconds per iteration: ours (the train config's loader and network placement) and the zoo's
    CacheDataset + DataLoader feeding the same network in PyTorch's default layout."""
    patches = {"batch_size": 1, "samples_per_volume": args.train_patches}
    parts = ours.training_parts(bundle, args.train_datalist, work / "train", {**overrides, **patches})
    ours_times = training_seconds(parts, parts["loader"], args.train_seconds)
    zoo_overrides = {**overrides, **patches, "channels_last": False}
    zoo_parts = ours.training_parts(bundle, args.train_datalist, work / "zoo", zoo_overrides, loader=False)
    train_cases = cases(args.train_datalist, role="train")
    loader = baseline.training_loader(settings, train_cases, 1, args.train_patches)
    base_times = training_seconds(zoo_parts, loader, args.train_seconds)
    ours_it, base_it = 1 / ours_times["with_data_s"], 1 / base_times["with_data_s"]
    return {
        "train_patches_per_iteration": args.train_patches,
        "train_iterations_timed": ours_times["iterations"],
        "train_it_s_ours": round(ours_it, 4),
        "train_it_s_baseline": round(base_it, 4),
        "train_speedup": ratio(ours_it, base_it),
        "train_s_ready_tensors": round(ours_times["ready_tensors_s"], 3),
        "train_s_ready_tensors_baseline": round(base_times["ready_tensors_s"], 3),
        "data_overhead": overhead(ours_times),
        "data_overhead_baseline": overhead(base_times),
    }


def overhead(times: dict[str, float]) -> float:
    """The data pipeline's share of an iteration (0 when prefetching hides it entirely)."""
    return round(max(0.0, 1 - times["ready_tensors_s"] / times["with_data_s"]), 3)


def dice_pair(bundle: str, args: argparse.Namespace, work: Path, network_settings: dict) -> dict:
    """Dice of ours and the baseline with trained weights on the labelled test cases (every window runs)."""
    if args.checkpoints is None:
        return {"dice_ours": None, "dice_baseline": None}
    checkpoint = find_checkpoint(args.checkpoints, bundle)
    test = cases(args.dice_datalist, role="test")
    overrides = training_overrides(args.checkpoints, bundle)
    network, settings = ours.build_network(bundle, checkpoint, overrides)
    settings["num_workers"] = baseline.NUM_WORKERS
    images = [case["image"] for case in test]
    ours.inference(bundle, images, work / "dice_ours", checkpoint, None, overrides)
    baseline.inference(network, settings, images, work / "dice_baseline", None)
    scores = {}
    for side in ("ours", "baseline"):
        folder = work / f"dice_{side}"
        values = [
            dice(segmentation_of(c["image"], folder), Path(c["label"]), settings["num_classes"]) for c in test
        ]
        scores[f"dice_{side}"] = round(sum(values) / len(values), 4)
    return scores


NOT_MODEL_KEYS = ("tracking", "experiment_name", "run_name", "tracked_tags", "val_fold", "tta", "num_workers")


def training_overrides(root: Path, bundle: str) -> dict:
    """The settings the checkpoint was trained and evaluated with (spacing, patch size...), from the
    job record ``medseg compare`` leaves in ``<root>/jobs/``; none when there is no record."""
    record = root / "jobs" / f"{bundle}_fold0_evaluate.json"
    if not record.is_file():
        return {}
    overrides = json.loads(record.read_text())["kwargs"].get("overrides", {})
    return {key: value for key, value in overrides.items() if not key.startswith(NOT_MODEL_KEYS)}


def find_checkpoint(root: Path, bundle: str) -> Path:
    for candidate in (root / bundle / "fold0" / "models" / "model.pt", root / bundle / "models" / "model.pt",
                      root / bundle / "model.pt"):  # fmt: skip
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no model.pt for {bundle} under {root} (looked in <bundle>/fold0/models/)")


def bench_bundle(bundle: str, args: argparse.Namespace, image: str) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(0)
    overrides = bundle_overrides(bundle, args.quick)
    work = args.work / bundle
    row = {"bundle": bundle, **inference_pair(bundle, args, image, work, overrides)}
    if args.nnunet_result:
        row.update(nnunet.row_fields(args.nnunet_result, row["inference_s_ours"]))
    settings = row.pop("_settings")
    row.update(training_pair(bundle, args, work, overrides, settings))
    row.update(dice_pair(bundle, args, work, settings))
    row["bench_s"] = round(time.perf_counter() - started, 1)
    print(f"bench: {bundle} measured in {row['bench_s']} s", file=sys.stderr, flush=True)
    return row


COLUMNS = [
    ("bundle", "bundle"), ("inference_s_ours", "infer s ours"), ("inference_s_baseline", "infer s zoo"),
    ("inference_speedup", "speed-up"), ("dice_ours", "Dice ours"), ("dice_baseline", "Dice zoo"),
    ("forward_fraction_of_peak", "fwd/peak"), ("train_it_s_ours", "train it/s ours"),
    ("train_it_s_baseline", "train it/s zoo"), ("train_speedup", "train speed-up"),
    ("data_overhead", "data overhead"), ("peak_mem_gib", "peak GiB"), ("vs_nnunet", "nnU-Net s / ours"),
]  # fmt: skip


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, MONAI {m['monai']}, "
        f"matmul {m['matmul_gflops']} GFLOP/s; volume {results['volume']}",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    for row in results["bundles"]:
        lines.append("| " + " | ".join("-" if row.get(k) is None else str(row[k]) for k, _ in COLUMNS) + " |")
    if any(row["inference_extrapolated"] for row in results["bundles"]):
        lines.append(f"Inference seconds extrapolated: {results['sample_calls']} batch(es) of windows timed "
                     "after a one-window warm-up, the network's share scaled to all windows.")  # fmt: skip
    if results.get("nnunet"):
        lines.append(nnunet.summary(results["nnunet"]))
    for row in results["scaling"].get("inference", []):
        lines.append(f"scaling {results['scaling']['bundle']}: {row}")
    for row in results["scaling"].get("cache", []):
        lines.append(f"cache {results['scaling']['bundle']}: {row}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundles", nargs="+", default=volume_bundles(), choices=volume_bundles())
    parser.add_argument("--quick", action="store_true", help="tiny volume and networks: a smoke test")
    parser.add_argument("--sample-calls", type=int, default=1, help="batches of windows timed for real")
    parser.add_argument("--train-seconds", type=float, default=8.0, help="time per training figure")
    parser.add_argument("--train-patches", type=int, default=1, help="patches per training iteration")
    parser.add_argument("--slices", type=int, help="slices of the 512x512 inference volume (default 300)")
    parser.add_argument("--scaling-slices", type=int, nargs="*", help="volume sizes for the scaling figure")
    parser.add_argument("--cache-cases", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument(
        "--checkpoints", type=Path, help="folder of <bundle>/fold0/models/model.pt: adds Dice"
    )
    parser.add_argument(
        "--dice-datalist", type=Path, default=BENCH_DIR.parent / "data/mni_brain/datalist.json"
    )
    parser.add_argument("--nnunet", action="store_true", help="add nnU-Net v2 (its own venv, made once)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument(
        "--large-image", type=int, help="side of the 2D overlap-tile image (default 4096; 0: none)"
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.volume = (*mode["volume"][:2], args.slices or mode["volume"][2])
    args.train_volume = mode["train_volume"]
    if args.scaling_slices is None:
        args.scaling_slices = [8, 16] if args.quick else [75, 150]
    if args.quick:
        args.cache_cases = args.cache_cases[:2]
    return args


def nnunet_peer(args: argparse.Namespace, image: str) -> dict | None:
    """nnU-Net on the bench's volume, once per run: one model serves every bundle's comparison."""
    if not args.nnunet:
        return None
    threads = torch.get_num_threads()  # ours, so that neither side has more cores
    return nnunet.peer(image, args.train_datalist, args.work / "nnunet", args.sample_calls, threads)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.machine = machine.describe(512 if args.quick else 3072)
    image = write_case(args.data_dir, "ct_{}x{}x{}".format(*args.volume), args.volume)["image"]
    args.train_datalist = write_datalist(args.data_dir, args.train_volume, 8)  # 4 train, 4 validation
    args.datalist = args.train_datalist
    results = {"machine": args.machine, "volume": list(args.volume), "sample_calls": args.sample_calls,
               "bundles": [], "scaling": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        args.work = Path(work)
        args.nnunet_result = nnunet_peer(args, image)
        if args.nnunet_result:
            results["nnunet"] = args.nnunet_result
        for bundle in args.bundles:
            results["bundles"].append(bench_bundle(bundle, args, image))
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # a long run keeps what it measured
        # the fastest network, so the figure shows the pipeline's growth more than the network's
        chosen = "resunet" if "resunet" in args.bundles else args.bundles[0]
        checkpoint = args.work / chosen / "models" / "model.pt"
        results["scaling"] = scaling(chosen, args, bundle_overrides(chosen, args.quick), checkpoint)
    side = args.large_image if args.large_image is not None else (512 if args.quick else 4096)
    if side:
        results["large_image"] = large_image(side, args.sample_calls, args.data_dir)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
