"""Real probes of a bundle's network on this device: one training step's peak memory and its time.

The planning rules ask these rather than a formula of parameters and voxels, which drifts with every
network, library and machine (issue 15: "measure the fit with a short real probe").
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.bundle_parser import bundle_parser
from pipeline.planning import rules

# The memory probe's size, per dimension (2D: a plane of about as many voxels); larger patches are
# scaled from it.
REFERENCE_PATCH = {3: (32, 32, 32), 2: (192, 192)}


class StepProbe:
    """Memory of one training step of a bundle's network: one real forward/backward at a reference
    patch, scaled linearly in voxels and batch (activations are), weights and gradients fixed."""

    def __init__(
        self,
        bundle: str,
        in_channels: int,
        num_classes: int,
        fixed_divisor: Sequence[int] | None = None,
        device: str | None = None,
        spatial_dims: int | None = None,
    ) -> None:
        self.bundle, self.in_channels, self.num_classes = bundle, in_channels, num_classes
        self.fixed_divisor, self.device = fixed_divisor, device
        self.dims = {} if spatial_dims is None else {"spatial_dims": spatial_dims}  # else the bundle's own
        self.measured: dict[str, tuple[int, float]] = {}

    def network(self, patch: Sequence[int], keys: dict, entry: str = "network_def"):
        shape = {"in_channels": self.in_channels, "num_classes": self.num_classes, "patch_size": list(patch),
                 **self.dims}  # fmt: skip
        parser = bundle_parser(self.bundle, "train", {**shape, **keys}, meta=False)
        return parser.get_parsed_content(entry)

    def bytes(self, patch: Sequence[int], batch: int, keys: dict) -> int:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        signature = repr(sorted(keys.items()))
        if signature not in self.measured:
            reference = tuple(min(r, p) for r, p in zip(REFERENCE_PATCH[len(patch)], patch, strict=True))
            if self.fixed_divisor:  # UNETR's ViT is built for the patch itself
                reference = (
                    tuple(patch) if self.bundle == "unetr" else rules.divisible(reference, self.fixed_divisor)
                )
            network = self.network(reference, keys)
            weights = 2 * sum(p.numel() * p.element_size() for p in network.parameters())  # + gradients
            cost = measure_step(network, reference, rules.MIN_BATCH, self.in_channels, device)
            voxels = float(np.prod(reference)) * rules.MIN_BATCH
            self.measured[signature] = (weights, max(cost.peak_bytes - weights, 0) / voxels)
        weights, per_voxel = self.measured[signature]
        return int(weights + per_voxel * float(np.prod(patch)) * batch)

    def seconds(self, patch: Sequence[int], batch: int, keys: dict) -> float:
        """Seconds of one training step at the patch and batch themselves (time does not scale with
        voxels as memory does: small patches use the cores worse), of the network as the training
        builds it (``network``: on the device, channels-last where the bundle says so)."""
        network = self.network(patch, keys, entry="network")
        return time_step(network, patch, batch, self.in_channels)


def time_step(network, patch: Sequence[int], batch: int, in_channels: int, repeats: int = 3) -> float:
    """The fastest of ``repeats`` forward/backward/optimiser steps after a first one, which also builds
    the convolutions' kernels; another process taking a core for a moment slows one step, never
    speeds one up. Plain steps: ``measure_step``'s memory hooks would slow them."""
    parameter = next(network.parameters())
    x = torch.randn(batch, in_channels, *patch, device=parameter.device)
    layout = {5: torch.channels_last_3d, 4: torch.channels_last}.get(parameter.dim())
    if layout is not None and parameter.is_contiguous(memory_format=layout):
        x = x.contiguous(memory_format=layout)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.0)  # the step's cost, weights unchanged
    network.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out.float().mean().backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


@dataclass(frozen=True)
class StepCost:
    """One measured training step: peak memory above the baseline (bytes) and its seconds."""

    peak_bytes: int
    seconds: float


def measure_step(
    network, patch: Sequence[int], batch: int, in_channels: int, device: str = "cpu"
) -> StepCost:
    """Peak memory and time of one real forward/backward of ``network`` on a random batch.

    GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before. CPU: the growth of the
    resident set (the kernel's peak, reset through ``/proc/self/clear_refs``; where that is refused,
    sampled every 2 ms). The network is trained in place for one step with a zero learning rate, so
    its weights are unchanged.
    """
    device = torch.device(device)
    network = network.to(device).train()
    x = torch.randn(batch, in_channels, *patch, device=device)
    saved: dict[int, int] = {}  # storage -> bytes of what autograd keeps for the backward pass

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with _peak_memory(device) as peak, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        start = time.perf_counter()
        out = network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out.float().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    network.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return StepCost(peak["bytes"], seconds)
    # On a CPU the resident set grows only where the allocator has no freed pages to reuse, so a
    # process that ran larger steps before reads too little: the kept activations and the gradients
    # are a floor that does not depend on the process's history.
    gradients = sum(p.numel() * p.element_size() for p in network.parameters())
    return StepCost(max(peak["bytes"], sum(saved.values()) + gradients), seconds)


class _peak_memory:
    """Context manager filling ``{"bytes": peak above baseline}`` for the block (see measure_step)."""

    def __init__(self, device) -> None:
        self.device = device
        self.result = {"bytes": 0}

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self.result
        self.base = _rss()
        self.sampler = None
        if not _reset_peak_rss():
            self.samples = [self.base]
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self.result

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.samples.append(_rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.sampler is None:
            peak = _peak_rss()
        else:
            self.stop.set()
            self.sampler.join()
            peak = max([*self.samples, _rss()])
        self.result["bytes"] = max(int(peak - self.base), 0)


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where it is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
