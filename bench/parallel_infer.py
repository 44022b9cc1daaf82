"""Inference spread over processes (issue 19, item 4): ``infer`` with nproc 1 and 2 on the same cases.

For 1 and 2 cases per worker, the same 2 or 4 CT-like volumes (``bench.volumes``, 0.8x0.8x2.5 mm) are
segmented once by one process and once by two workers, with seeded untrained weights (timing needs
no training), untracked, each run into a fresh folder so that no case is skipped. An untimed run goes
first, so that the one-process figures pay no first-call costs; the two-worker figures include the
workers' start (a fresh interpreter each: imports, config parsing), which is what ``--nproc`` costs.
On a CPU the workers share the cores (``OMP_NUM_THREADS`` = cores // 2), the one process uses them all.

    .venv/bin/python -m bench.parallel_infer            # resunet's own network on 512x512x100 CTs (minutes)
    .venv/bin/python -m bench.parallel_infer --quick    # tiny network and volumes: a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench import machine, ours
from bench.run import QUICK, bundle_overrides
from bench.volumes import write_case, write_datalist
from pipeline.inference.parallel import usable_cores, worker_environments
from pipeline.workflows import infer

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "data" / "cache" / "bench-parallel"
SHAPE = (512, 512, 100)  # resunet: ~9 s a case on two cores (README: 7.1 s at 75 slices)
CASES_PER_WORKER = (1, 2)
WORKERS = 2


def timed_infer(
    bundle: str, images: list[str], out: Path, checkpoint: Path, overrides: dict, nproc: int
) -> float:
    """Wall seconds of one ``infer`` into an empty ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    infer(bundle, images, out, checkpoint, overrides, tracking=False, overwrite=True, nproc=nproc)
    return round(time.perf_counter() - start, 2)


def measure(bundle: str, shape: tuple[int, int, int], overrides: dict, work: Path) -> list[dict[str, Any]]:
    """One row per number of cases per worker: both wall times and the speed-up of two workers."""
    checkpoint = ours.seeded_checkpoint(
        bundle, write_datalist(work / "data", (16, 16, 8), 1), work / "models", overrides
    )
    size = "x".join(map(str, shape))
    most = WORKERS * max(CASES_PER_WORKER)
    images = [
        write_case(work / "data", f"ct_{size}_{index}", shape, seed=index)["image"] for index in range(most)
    ]
    timed_infer(bundle, images[:1], work / "warm-up", checkpoint, overrides, 1)
    rows = []
    for per_worker in CASES_PER_WORKER:
        cases = images[: WORKERS * per_worker]
        one = timed_infer(bundle, cases, work / "out" / f"{per_worker}-one", checkpoint, overrides, 1)
        two = timed_infer(bundle, cases, work / "out" / f"{per_worker}-two", checkpoint, overrides, WORKERS)
        rows.append({"cases_per_worker": per_worker, "cases": len(cases), "nproc_1_s": one,
                     f"nproc_{WORKERS}_s": two, "speedup": round(one / two, 2)})  # fmt: skip
    return rows


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"{m['cpu']}, {results['cores']} cores ({results['threads_per_worker']} threads per worker), "
        f"torch {m['torch']}; {results['bundle']} ({results['network']}) on {results['shape']} CT volumes",
        f"| cases per worker | cases | nproc=1 s | nproc={WORKERS} s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        values = [
            row["cases_per_worker"],
            row["cases"],
            row["nproc_1_s"],
            row[f"nproc_{WORKERS}_s"],
            row["speedup"],
        ]
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="resunet")
    parser.add_argument("--quick", action="store_true", help="tiny network and volumes: a smoke test")
    parser.add_argument(
        "--shape", type=int, nargs=3, help=f"volume size (default {SHAPE}; --quick: {QUICK['volume']})"
    )
    parser.add_argument("--work", type=Path, default=WORK, help="volumes, weights and outputs (a cache)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    shape = tuple(args.shape or (QUICK["volume"] if args.quick else SHAPE))
    overrides = bundle_overrides(args.bundle, args.quick)
    results = {
        "machine": machine.describe(512),
        "cores": usable_cores(),
        "threads_per_worker": int(worker_environments(WORKERS)[0]["OMP_NUM_THREADS"]),
        "bundle": args.bundle,
        "network": "tiny" if args.quick else "the bundle's own",
        "shape": list(shape),
        "rows": measure(args.bundle, shape, overrides, args.work),
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
