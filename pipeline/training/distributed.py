"""One process per GPU (or per CPU worker) under torchrun: set-up, device, wrapping, rank checks.

The same config runs on GPUs (NCCL) and on CPUs (Gloo): the backend follows the hardware, so a
laptop can test what a cluster will run.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs progress and tracks."""
    return not is_distributed() or dist.get_rank() == 0


def device() -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK), else the first GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


# Native thread pools that a forked data-loader worker inherits broken (OpenVINO's, ONNX Runtime's):
# imported only when an inference has run its windows on them in this process.
FORK_UNSAFE_MODULES = ("openvino", "onnxruntime")


def fork_safe_workers(num_workers: int) -> int:
    """``num_workers``, or none when this process has run OpenVINO or ONNX Runtime (an inference
    before a training in one Python session: a notebook, a test run): workers forked after their
    thread pools started crashed the process at their shutdown (seen: SIGSEGV, SIGABRT), so the
    loading runs in this process then, slower but sound. A ``medseg`` command is one workflow per
    process and keeps its workers."""
    if num_workers > 0 and any(name in sys.modules for name in FORK_UNSAFE_MODULES):
        logger.warning(
            "an ONNX runtime has run in this process: data loading without worker processes (forking now "
            "is unsafe); run the training in its own process to keep its %d workers",
            num_workers,
        )
        return 0
    return num_workers


def data_loader_workers(cores: int | None = None) -> int:
    """Data-loader workers for this process: 0 on two cores or fewer, else one core left for training,
    at most 8 (``cores``: this process's share of the cores it may run on; under torchrun the node's
    cores are shared by its processes).

    Why 0 on two cores: the deterministic steps are cached (CacheDataset), so a worker only augments a
    few patches per step, while it takes one of the two cores the convolutions use during every step;
    with no worker the augmentation runs between steps on both cores. Beyond 8 workers a 3D pipeline
    gains little and each one costs memory (a copy of the transforms' state).
    """
    if cores is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores = usable // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return 0 if cores <= 2 else min(cores - 1, 8)


def setup(distributed: bool) -> None:
    """Join the torchrun process group when the config is the multi-GPU one; nothing otherwise."""
    if not distributed or is_distributed():
        return
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError("the multi-GPU config must be launched by torchrun (medseg train --nproc N)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend)
    if not is_main_process():
        logging.disable(logging.INFO)  # one voice: ranks > 0 still report warnings and errors


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap(network: torch.nn.Module, on: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around a network already on its device."""
    device_ids = [on.index] if on.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
