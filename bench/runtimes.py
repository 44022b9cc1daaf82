"""PyTorch eager against ONNX Runtime and OpenVINO per bundle: windows per second at the bundle's
patch and window batch, the softmax difference from PyTorch, and (``--end-to-end``) the whole
inference of the CT-sized bench volume on each runtime, each in a fresh process; writes
``bench/runtimes.json`` and prints a markdown table. Seeded random weights (timing needs no
training); agreement on trained weights is ``medseg evaluate ... runtime=...`` on the demo's cases.

    .venv/bin/python -m bench.runtimes [--bundles unet3d resunet] [--quick] [--end-to-end]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import machine
from bench.isolated import in_fresh_process
from bench.measure import window_flops
from bench.ours import seeded_checkpoint
from bench.run import DATA_DIR, FULL, QUICK, bundle_overrides
from bench.volumes import write_case, write_datalist
from pipeline.bundle_parser import bundle_parser
from pipeline.inference.runtimes import RUNTIMES, RuntimeNetwork, read_facts
from pipeline.io.checkpoint import load_network_weights
from pipeline.paths import available_bundles

BENCH_DIR = Path(__file__).resolve().parent


def placed_network(bundle: str, checkpoint: Path, overrides: dict) -> tuple[torch.nn.Module, dict]:
    """The inference config's network (device, channels-last as the bundle sets it) with the weights,
    and its window settings."""
    parser = bundle_parser(bundle, "inference", overrides, checkpoint=checkpoint)
    network = load_network_weights(parser.get_parsed_content("network"), checkpoint).eval()
    settings = {key: parser.get_parsed_content(key) for key in ("patch_size", "sw_batch_size", "cpu_runtime")}
    return network, settings


def timed_calls(network: torch.nn.Module, batch: torch.Tensor, calls: int) -> float:
    """Seconds per call after one untimed call (the export, the check, allocations)."""
    with torch.inference_mode():
        network(batch)
        started = time.perf_counter()
        for _ in range(calls):
            network(batch)
    return (time.perf_counter() - started) / calls


def window_rates(bundle: str, checkpoint: Path, overrides: dict, calls: int, gflops_peak: float) -> dict:
    network, settings = placed_network(bundle, checkpoint, overrides)
    patch, windows = settings["patch_size"], settings["sw_batch_size"]
    batch = torch.randn((windows, 1, *patch), generator=torch.Generator().manual_seed(0))
    flops = window_flops(network, patch)
    row: dict[str, Any] = {
        "patch": patch, "windows_per_call": windows, "gflop_per_window": round(flops / 1e9, 2),
        "cpu_runtime": settings["cpu_runtime"],
    }  # fmt: skip
    for runtime in RUNTIMES:
        model = network if runtime == "torch" else RuntimeNetwork(network, runtime, checkpoint)
        started = time.perf_counter()
        seconds = timed_calls(model, batch, calls)
        per_window = seconds / windows
        row[f"{runtime}_windows_per_s"] = round(1 / per_window, 3)
        row[f"{runtime}_fraction_of_peak"] = round(flops / per_window / 1e9 / gflops_peak, 3)
        if runtime != "torch":
            row[f"{runtime}_first_call_s"] = round(time.perf_counter() - started - seconds * calls, 1)
            row[f"{runtime}_used"] = model._runs[tuple(batch.shape[1:])] is not None
            exports = sorted((checkpoint.parent / "onnx").glob("*.onnx"))
            row[f"{runtime}_softmax_difference"] = read_facts(exports[-1])["softmax_difference"][runtime]
    return row


def end_to_end(bundle: str, checkpoint: Path, image: str, overrides: dict, work: Path, calls: int) -> dict:
    """Seconds for the whole inference of ``image`` on each runtime (windows beyond ``calls`` batches
    extrapolated, as ``make bench`` does), in fresh processes."""
    row = {}
    for runtime in RUNTIMES:
        spec = {"bundle": bundle, "images": [image], "checkpoint": str(checkpoint), "side": "ours",
                "overrides": {**overrides, "runtime": runtime}, "sample_calls": calls,
                "output_dir": str(work / f"{bundle}-{runtime}")}  # fmt: skip
        result = in_fresh_process(spec)
        row[f"{runtime}_inference_s"] = round(result["seconds"], 1)
        row[f"{runtime}_peak_mem_gib"] = round(result["peak_mem_gib"], 2)
    return row


COLUMNS = ["bundle", "torch_windows_per_s", "onnxruntime_windows_per_s", "openvino_windows_per_s",
           "torch_fraction_of_peak", "openvino_fraction_of_peak", "onnxruntime_softmax_difference",
           "openvino_softmax_difference", "torch_inference_s", "onnxruntime_inference_s",
           "openvino_inference_s", "cpu_runtime"]  # fmt: skip


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, matmul {m['matmul_gflops']} GFLOP/s",
             "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]  # fmt: skip
    for row in results["bundles"]:
        lines.append("| " + " | ".join(str(row.get(key, "-")) for key in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundles", nargs="+", default=available_bundles(), choices=available_bundles())
    parser.add_argument("--quick", action="store_true", help="tiny networks and volume: a smoke test")
    parser.add_argument("--calls", type=int, default=3, help="timed calls of a window batch per runtime")
    parser.add_argument("--end-to-end", action="store_true", help="also the CT-sized inference per runtime")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "runtimes.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": machine.describe(512 if args.quick else 3072), "bundles": []}
    datalist = write_datalist(DATA_DIR, mode["train_volume"], 2)
    image = write_case(DATA_DIR, "ct_{}x{}x{}".format(*mode["volume"]), mode["volume"])["image"]
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as folder:
        work = Path(folder)
        for bundle in args.bundles:
            overrides = quick_overrides(bundle) if args.quick else {}
            checkpoint = seeded_checkpoint(bundle, datalist, work / bundle / "models", overrides)
            row = {"bundle": bundle, **window_rates(bundle, checkpoint, overrides, args.calls,
                                                    results["machine"]["matmul_gflops"])}  # fmt: skip
            if args.end_to_end and bundle != "unet2d":
                row.update(end_to_end(bundle, checkpoint, image, overrides, work, 1))
            results["bundles"].append(row)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    print(table(results))
    return results


def quick_overrides(bundle: str) -> dict:
    if bundle == "unet2d":
        return {
            "patch_size": [64, 64],
            "spacing": [1.0, 1.0],
            "features": [4, 8, 16, 32, 64],
            "sw_batch_size": 2,
        }
    return bundle_overrides(bundle, quick=True)


if __name__ == "__main__":
    main()
