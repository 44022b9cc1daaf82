"""Inference over 50 generated volumes in one process keeps its memory flat.

A leak per case (cached tensors, MetaTensor histories, handlers holding outputs) would make a batch
of thousands of scans run out of memory hours in. The run happens in its own process, whose resident
memory a thread samples each time a segmentation appears on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, phantom, tiny
from model_factory import untrained_model

from pipeline.workflows import PROJECT_ROOT

CASES = 50
WARM_UP = 10  # allocator pools and caches fill during the first cases
MAX_GROWTH = 0.05

RUN = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from pathlib import Path
    from pipeline.workflows import infer

    inputs, out, model, settings = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    page = os.sysconf("SC_PAGE_SIZE")
    samples, done = {}, threading.Event()

    def sample():
        while not done.is_set():
            count = len(list(out.glob("*_seg.nii.gz"))) if out.is_dir() else 0
            with open("/proc/self/statm") as statm:
                samples.setdefault(count, int(statm.read().split()[1]) * page)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    infer("unet3d", [inputs], out, model, settings, tracking=False)
    done.set()
    watcher.join()
    print(json.dumps(samples))
    """
)


@pytest.mark.long
def test_memory_stays_flat_over_fifty_cases(phantom_datalist: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "scans").mkdir()
    for index in range(CASES):
        image, _ = phantom((40, 44, 36), rng)
        nib.save(nib.Nifti1Image(image, PHANTOM_AFFINE), tmp_path / "scans" / f"scan_{index:03d}.nii.gz")
    model = untrained_model("unet3d", phantom_datalist, tmp_path / "models")
    settings = tiny("unet3d")
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "scans"), str(tmp_path / "out"), str(model),
         json.dumps(settings)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rss = {int(count): value for count, value in json.loads(result.stdout.splitlines()[-1]).items()}
    assert len(list((tmp_path / "out").glob("*_seg.nii.gz"))) == CASES
    # Medians of ten cases: the allocator moves a few percent up and down from case to case, a leak
    # moves the whole window up.
    after_warm_up = np.median([rss[count] for count in range(WARM_UP, WARM_UP + 10) if count in rss])
    last = np.median([rss[count] for count in range(CASES - 9, CASES + 1) if count in rss])
    growth = last / after_warm_up - 1
    print(f"RSS cases {WARM_UP}-{WARM_UP + 9}: {after_warm_up / 2**20:.0f} MiB, cases {CASES - 9}-{CASES}: "
          f"{last / 2**20:.0f} MiB (highest {max(rss.values()) / 2**20:.0f} MiB)")  # fmt: skip
    assert growth < MAX_GROWTH, f"memory grew {growth:.1%} from case {WARM_UP} to {CASES}"
