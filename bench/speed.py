"""Seconds per training iteration and per sliding-window inference window, for every bundle.

The networks are built exactly as the bundles build them (their configs, full size), for one
input channel and three classes; a training iteration is forward + DiceCE loss + backward + AdamW
step on one batch (``batch_size`` volumes x ``samples_per_volume`` patches) of the bundle's
patch size, an inference window is one no-grad forward of one patch. Median of ``repeats`` timed
runs after one warm-up.

    .venv/bin/python bench/speed.py [--repeats 3] [--out bench/speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from pipeline.workflows import available_bundles, config_files


def build(name: str) -> tuple[torch.nn.Module, list[int], int]:
    parser = ConfigParser()
    parser.read_config(config_files(name, "train"))
    parser.update({"in_channels": 1, "num_classes": 3})
    patches_per_iteration = parser["batch_size"] * parser["samples_per_volume"]
    return parser.get_parsed_content("network_def"), parser["patch_size"], patches_per_iteration


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    network, patch, batch_size = build(name)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.randn(batch_size, 1, *patch)
    labels = torch.randint(0, 3, (batch_size, 1, *patch))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(network(images), labels).backward()
        optimizer.step()

    def infer_window() -> None:
        with torch.no_grad():
            network(images[:1])

    network.train()
    train_s = median_seconds(train_step, repeats)
    network.eval()
    infer_s = median_seconds(infer_window, repeats)
    parameters = sum(p.numel() for p in network.parameters())
    return {
        "bundle": name,
        "parameters": parameters,
        "patch": patch,
        "batch_size": batch_size,
        "train_s_per_iteration": round(train_s, 3),
        "inference_s_per_window": round(infer_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "speed.json")
    args = parser.parse_args()
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = [measure(name, args.repeats) for name in available_bundles()]
    args.out.write_text(json.dumps({"machine": machine, "bundles": rows}, indent=2) + "\n")
    print(f"| bundle | parameters | patch | train s/iteration (batch) | inference s/window |  ({machine})")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['bundle']} | {r['parameters']:,} | {r['patch']} | {r['train_s_per_iteration']} "
              f"({r['batch_size']}) | {r['inference_s_per_window']} |")  # fmt: skip


if __name__ == "__main__":
    main()
