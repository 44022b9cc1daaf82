"""One inference side (ours or the baseline) in a fresh process, so its peak memory is its own.

Memory a previous bundle's run left allocated (glibc keeps freed pages) would otherwise count
towards the next one. The parent writes a spec as JSON and reads the result back:

    python -m bench.isolated spec.json result.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import baseline, machine, ours


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Segment ``spec["images"]`` with ours or the baseline; wall seconds (with every window as if run)
    and the sampled network's windows, plus the process tree's peak memory."""
    checkpoint, overrides = Path(spec["checkpoint"]), spec["overrides"]
    output_dir = Path(spec["output_dir"])
    with machine.PeakMemory() as memory:
        if spec["side"] == "ours":
            wall, sampled = ours.inference(
                spec["bundle"], spec["images"], output_dir, checkpoint, spec["sample_calls"], overrides
            )
        else:
            network, settings = ours.build_network(spec["bundle"], checkpoint, overrides)
            settings["num_workers"] = overrides.get("num_workers", baseline.NUM_WORKERS)
            images, calls = spec["images"], spec["sample_calls"]
            wall, sampled = baseline.inference(network, settings, images, output_dir, calls)
    return {
        "seconds": sampled.total_seconds(wall),
        "windows": sampled.windows,
        "seconds_per_window": sampled.seconds_per_window,
        "extrapolated": sampled.extrapolated,
        "peak_mem_gib": memory.gib,
    }


def in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-side-") as folder:
        spec_file, result_file = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_file.write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", "bench.isolated", str(spec_file), str(result_file)], check=True)
        return json.loads(result_file.read_text())


if __name__ == "__main__":
    result = run_side(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result))
