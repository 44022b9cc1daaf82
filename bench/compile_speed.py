"""``python -m bench.compile_speed``: the ``compile`` key (torch.compile) against eager, per bundle.

Per volume bundle and unet2d, the bundle's network as its config builds it at full size (its own
patch, ``sw_batch_size`` and channels-last; seeded weights, as timing needs no training), on the
config's device:

* inference: seconds per window, ``sw_batch_size`` windows a call, in evaluation mode without
  gradients, eager against compiled; the compiled network's first call (its compilation) is reported
  apart, and so is the recompilation a smaller last batch of a volume's windows costs;
* training: seconds per step (forward, the bundle's loss, backward, optimiser step) on
  ``batch_size`` x ``samples_per_volume`` patches, eager against compiled, the first step apart.

Writes ``bench/compile_speed.json`` (``--out``) after each bundle and prints a markdown table.
``--quick`` is a smoke test of the harness (tiny networks, 32-voxel patches, one timed call; written
under ``data/cache/``): its figures say nothing of the bundles.

    .venv/bin/python -m bench.compile_speed [--bundles unet3d resunet] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from bench import machine
from bench.run import bundle_overrides
from pipeline.bundle_parser import bundle_parser
from pipeline.io.atomic import atomic_write
from pipeline.paths import PLANAR_BUNDLES, volume_bundles

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "compile_speed.json"
QUICK_OUT = ROOT / "data" / "cache" / "compile_speed_quick.json"  # git-ignored: a smoke test's figures
# Timing needs the channels and classes only: a CT with two organs, as bench/volumes.py writes.
HEADER = {
    "name": "bench-ct",
    "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "liver", "2": "kidney"},
}
QUICK_PLANAR = {"patch_size": [32, 32], "features": [4, 8, 16, 32, 64], "sw_batch_size": 2, "num_workers": 0}


def bundles() -> list[str]:
    return [*volume_bundles(), *PLANAR_BUNDLES]


def quick_overrides(bundle: str, quick: bool) -> dict[str, Any]:
    """``make bench``'s tiny networks and patches (the 2D ones for unet2d); none for a measurement."""
    if not quick:
        return {}
    return dict(QUICK_PLANAR) if bundle in PLANAR_BUNDLES else bundle_overrides(bundle, True)


def parts(bundle: str, compiled: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The train config's network, optimiser, loss and the sizes they run at, seeded alike."""
    parser = bundle_parser(bundle, "train", {**overrides, "dataset_info": HEADER, "compile": compiled})
    torch.manual_seed(0)
    keys = ("network", "optimizer", "device", "amp", "crop_size", "sw_batch_size", "batch_size",
            "samples_per_volume", "num_classes", "in_channels")  # fmt: skip
    found = {key: parser.get_parsed_content(key) for key in keys}
    found["loss"] = parser.get_parsed_content("train::loss")
    return found


def autocast(found: dict[str, Any]) -> torch.autocast:
    """Mixed precision where the bundle's engines use it (``amp``: on a GPU), as they do: the forward
    and the loss, not the backward."""
    return torch.autocast(found["device"].type, enabled=found["amp"])


def timed(call: Callable[[], Any], device: torch.device) -> float:
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - started


def first_and_steady(call: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """The first call's seconds (a compiled network compiles there) and the median of the next ones."""
    first = timed(call, device)
    return first, statistics.median(timed(call, device) for _ in range(repeats))


def inference_times(found: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per window in evaluation mode, and, for a compiled network, the first call's extra."""
    network, batch, device = found["network"].eval(), found["sw_batch_size"], found["device"]
    windows = torch.randn(batch, found["in_channels"], *found["crop_size"], device=device)
    with torch.no_grad(), autocast(found):
        first, steady = first_and_steady(lambda: network(windows), device, repeats)
        # a volume's last batch of windows is often smaller: a new shape, compiled again
        smaller = timed(lambda: network(windows[:1]), device) if batch > 1 else None
    row = {"s_per_window": steady / batch, "first_call_extra_s": first - steady}
    if smaller is not None:
        row["smaller_batch_first_call_s"] = smaller
    return row


def training_times(found: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per training step on random patches, and the first step's extra (its compilation)."""
    network, optimizer, loss, device = (
        found["network"].train(),
        found["optimizer"],
        found["loss"],
        found["device"],
    )
    count, size = found["batch_size"] * found["samples_per_volume"], found["crop_size"]
    images = torch.randn(count, found["in_channels"], *size, device=device)
    labels = torch.randint(0, found["num_classes"], (count, 1, *size), device=device).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(found):
            value = loss(network(images), labels)
        value.backward()
        optimizer.step()

    first, steady = first_and_steady(step, device, repeats)
    return {"s_per_step": steady, "first_step_extra_s": first - steady}


def measure(bundle: str, compiled: bool, overrides: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Inference and training times; compiled, also TorchDynamo's graph breaks and graphs: code it
    cannot trace runs eagerly between graphs, and a frame recompiled past torch's limit (8) runs eagerly
    from then on (unet2d's MONAI up-sampling block breaks at ``torch.jit.isinstance``)."""
    counters.clear()
    found = parts(bundle, compiled, overrides)
    row = {"inference": inference_times(found, repeats), "training": training_times(found, repeats)}
    row["patch"], row["sw_batch_size"] = list(found["crop_size"]), found["sw_batch_size"]
    if compiled:
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["graphs"] = counters["stats"]["unique_graphs"]
    torch.compiler.reset()  # the next measurement compiles from nothing, as a new process would
    return row


def bundle_row(bundle: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = quick_overrides(bundle, args.quick)
    eager = measure(bundle, False, overrides, args.repeats)
    compiled = measure(bundle, True, overrides, args.repeats)
    return {"bundle": bundle, "patch": eager["patch"], "sw_batch_size": eager["sw_batch_size"],
            "eager": eager, "compiled": compiled}  # fmt: skip


def speedup(row: dict[str, Any], stage: str, key: str) -> str:
    return f"{row['eager'][stage][key] / row['compiled'][stage][key]:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bundle | patch | windows a call | s/window eager | compiled | gain | compile s | smaller batch s "
        "| s/step eager | compiled | gain | compile s | graph breaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        inference, training = row["compiled"]["inference"], row["compiled"]["training"]
        smaller = inference.get("smaller_batch_first_call_s")
        cells = [
            row["bundle"], "x".join(map(str, row["patch"])), str(row["sw_batch_size"]),
            f"{row['eager']['inference']['s_per_window']:.3f}", f"{inference['s_per_window']:.3f}",
            speedup(row, "inference", "s_per_window"), f"{inference['first_call_extra_s']:.0f}",
            "-" if smaller is None else f"{smaller:.0f}",
            f"{row['eager']['training']['s_per_step']:.3f}", f"{training['s_per_step']:.3f}",
            speedup(row, "training", "s_per_step"), f"{training['first_step_extra_s']:.0f}",
            str(row["compiled"]["graph_breaks"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundles", nargs="+", choices=bundles(), help="default: all")
    parser.add_argument("--repeats", type=int, help="timed calls after the first (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="tiny networks and patches: a smoke test")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(ROOT)} (quick: under data/cache)")
    args = parser.parse_args(argv)
    args.bundles = args.bundles or bundles()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.out = args.out or (QUICK_OUT if args.quick else OUT)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {"machine": machine.describe(512 if args.quick else 2048), "quick": args.quick,
                               "repeats": args.repeats, "bundles": []}  # fmt: skip
    for bundle in args.bundles:
        results["bundles"].append(bundle_row(bundle, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as handle:  # a long run keeps what it measured
            handle.write((json.dumps(results, indent=2) + "\n").encode())
    print(table(results["bundles"]))
    return results


if __name__ == "__main__":
    main()
