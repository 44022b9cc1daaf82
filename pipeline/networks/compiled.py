"""``torch.compile`` for the bundles' ``compile`` key: checked before anything runs, applied in place.

In place (``Module.compile()``) rather than ``torch.compile(network)``, as torch's guide advises
("Where to apply torch.compile?"): the network stays the same object, so its state dict keeps the
keys every checkpoint holds (no ``_orig_mod.`` prefix), the optimiser, the checkpoints handler and
the engines share one network, and DistributedDataParallel wraps the compiled module, the order the
guide gives for DDP (compile the inner module, then wrap it; DDP still tells TorchDynamo which module
it runs, so the graphs are still split at its gradient buckets).

MetaTensor inputs become plain tensors before the compiled call: TorchDynamo traces MONAI's
MetaTensor, but the compiled kernels refuse it at run time ("Multiple dispatch failed for
aten.convolution", pytorch#117026), which is why MONAI's own engines do the same with their
``compile=True``. The training's batches are MetaTensors; the sliding window passes plain tensors.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
from monai.data import MetaTensor
from torch.utils._triton import has_triton


def compile_problem(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` on this machine; None if it can.

    Inductor, its default backend, writes C++ for CPU kernels (Triton for GPU ones) and builds them
    at the first call: without the compiler a run would fail there, after its data were cached, at
    the end of a long torch traceback, rather than here, in one sentence.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return None if has_triton() else "Triton, which builds torch.compile's GPU kernels, is not installed"
    if device.type != "cpu":
        return None  # another backend: torch's own error at the first call
    names = [name for name in _cpp_compilers() if name]
    if any(shutil.which(name) for name in names):
        return None
    return f"no C++ compiler ({' or '.join(names)}) is on PATH to build torch.compile's CPU kernels"


def compile_in_place(network: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``network`` compiled in place for ``device`` (its first call compiles), or a RuntimeError
    saying what is missing: ``compile: true`` is asked for, so a run never goes on eager unnoticed
    (its MLflow record would say compiled, and its times would mislead)."""
    problem = compile_problem(device)
    if problem is not None:
        raise RuntimeError(
            f"compile: true, but {problem}: install one (or point $CXX at it), or run with compile: false"
        )
    network.compile()
    network._compiled_call_impl = _with_plain_tensors(network._compiled_call_impl)
    return network


def _with_plain_tensors(call: Callable[..., Any]) -> Callable[..., Any]:
    def plain_call(*args: Any, **kwargs: Any) -> Any:
        return call(*map(_plain, args), **{key: _plain(value) for key, value in kwargs.items()})

    return plain_call


def _plain(value: Any) -> Any:
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _cpp_compilers() -> tuple[str | None, ...]:
    """The compilers Inductor tries, in its order ($CXX, else g++; None: one it would download)."""
    from torch._inductor import config  # imported when asked: 1.5 s that an eager run never pays

    return tuple(config.cpp.cxx)
