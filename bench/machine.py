"""What the numbers were measured on, and the machine's practical peak (float32 matrix multiply).

The peak is measured, not taken from a spec sheet: a network's forward is judged against what
this CPU (or GPU) actually sustains on a large ``torch.mm``, in the same run.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import monai
import torch


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def matmul_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best of ``repeats`` float32 ``size``x``size`` products, in GFLOP/s (2 n^3 per product)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def describe(matmul_size: int = 2048) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "matmul_gflops": round(matmul_gflops(matmul_size, device=device), 1),
    }


def process_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between their users), else RSS: forked DataLoader
    workers share the parent's libraries, which a sum of RSS would count once per worker."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int | None = None) -> int:
    """Memory of a process and all its descendants (DataLoader workers hold the data)."""
    pid = pid or os.getpid()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return process_bytes(pid) + sum(tree_rss_bytes(int(c)) for c in children)


class PeakMemory:
    """Peak memory of this process tree (or CUDA allocation) while the block runs, sampled every
    250 ms: reading smaps takes CPU time from the work being timed, so not more often."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()

    @property
    def gib(self) -> float:
        return self.peak / 2**30
