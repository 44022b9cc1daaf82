"""Time a few sliding windows for real and extrapolate the network's share to the whole volume.

A full-size 3D network on a 2-core CPU needs seconds per 96^3 window and a CT has hundreds of
windows, so running every window would take the bench hours. ``SampledNetwork`` runs the first
``sample_calls`` batches of windows through the network and answers the rest with zeros of the
right shape: everything around the network (reading, resampling, stitching, inversion, writing)
still runs in full, and the network's time is the measured time per window times the windows.
"""

from __future__ import annotations

import time

import torch


class SampledNetwork(torch.nn.Module):
    """Wraps a network; ``sample_calls=None`` runs every call (for Dice), else only the first ones.

    Before the first call, its batch of windows goes through untimed (allocations, kernel choice,
    ONNX export; OpenVINO plans each new batch shape), so that every real call counts towards the rate.
    """

    def __init__(self, network: torch.nn.Module, sample_calls: int | None) -> None:
        super().__init__()
        self.network = network
        self.sample_calls = sample_calls
        self.timed: list[tuple[int, float]] = []  # (windows, seconds) of the real calls
        self.windows = 0
        self.network_seconds = 0.0  # all time spent in calls, real or not
        self._output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        if self._output is None:  # warm-up: left out of the rate, and out of the wall time by total_seconds
            self._output = self.network(x)[:1].detach()  # the batch's shape: runtimes plan per shape
            self.network_seconds += time.perf_counter() - started
            started = time.perf_counter()
        self.windows += x.shape[0]
        if self.sample_calls is None or len(self.timed) < self.sample_calls:
            output = self.network(x)
            if output.is_cuda:
                torch.cuda.synchronize()  # GPU kernels run asynchronously: wait before reading the clock
            self._output = output[:1].detach()
            self.timed.append((x.shape[0], time.perf_counter() - started))
        else:
            shape = (x.shape[0], *self._output.shape[1:])
            output = torch.zeros(shape, dtype=self._output.dtype, device=self._output.device)
        self.network_seconds += time.perf_counter() - started
        return output

    @property
    def seconds_per_window(self) -> float:
        return sum(s for _, s in self.timed) / max(1, sum(w for w, _ in self.timed))

    @property
    def extrapolated(self) -> bool:
        return self.sample_calls is not None and sum(w for w, _ in self.timed) < self.windows

    def total_seconds(self, wall: float) -> float:
        """The run's wall time with every window as if it had gone through the network."""
        return wall - self.network_seconds + self.windows * self.seconds_per_window
