"""Running a trained network's windows through ONNX Runtime or OpenVINO instead of PyTorch eager.

On a CPU the same convolutions run faster in OpenVINO's and ONNX Runtime's kernels than in
PyTorch's (``python -m bench.runtimes``: bundles/README.md, "Speed"). The network is exported once
to ONNX, cached beside its checkpoint under a name keyed by the checkpoint's hash, the network's
structure and the window shape, and checked against PyTorch on a seeded window before it is used:
a runtime whose softmax differs from PyTorch's by more than ``TOLERANCE`` is not used, and the
windows go through PyTorch (with a warning saying by how much they differed).

``RuntimeNetwork`` keeps the PyTorch network as ``module``, where the weights are loaded (as into a
data-parallel wrapper), and exports it at its first window, so the exported weights are the
loaded ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io.atomic import atomic_path, atomic_write
from pipeline.io.checkpoint import file_digest, unwrap

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
TOLERANCE = 1e-4  # largest difference from PyTorch's softmax that a runtime may make
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
CACHE_FOLDER = "onnx"  # beside the checkpoint
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medseg" / CACHE_FOLDER


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot run here (package missing), in words."""


def resolve_runtime(runtime: str, device: torch.device | str, cpu_default: str = "torch") -> str:
    """The runtime the windows go through: ``auto`` is the bundle's measured fastest on a CPU
    (``cpu_default``) and PyTorch on a GPU; ONNX Runtime and OpenVINO run on the CPU only here, so
    asked for on a GPU machine they give way to PyTorch on that GPU."""
    choice = cpu_default if runtime == "auto" else runtime
    if choice not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of auto, {', '.join(RUNTIMES)}")
    if choice != "torch" and torch.device(device).type != "cpu":
        if runtime != "auto":
            logger.warning(
                "runtime %s runs on the CPU only: the windows go through PyTorch on %s", choice, device
            )
        return "torch"
    return choice


def on_runtime(
    network: torch.nn.Module,
    runtime: str,
    checkpoint: str | Path | None = None,
    windows_per_call: int | None = None,
) -> torch.nn.Module:
    """``network`` itself for PyTorch, else a ``RuntimeNetwork`` around it."""
    if runtime == "torch":
        return network
    return RuntimeNetwork(network, runtime, checkpoint, windows_per_call)


def weights_digest(network: torch.nn.Module) -> str:
    """For a network without a checkpoint file (tests, benches): a hash of its weights."""
    digest = hashlib.sha256()
    for key, tensor in network.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_name(network: torch.nn.Module, checkpoint: Path | None, window: tuple[int, ...]) -> str:
    """``<checkpoint stem>-<weights hash>-<structure hash>-<C>x<window>.onnx``: another checkpoint,
    other network settings (the same weights can build different graphs) or another window shape
    is another file, so a stale export is never used."""
    weights = file_digest(checkpoint) if checkpoint else weights_digest(network)
    structure = hashlib.sha256(repr(network).encode()).hexdigest()
    stem = checkpoint.stem if checkpoint else "network"
    return f"{stem}-{weights[:16]}-{structure[:8]}-{'x'.join(map(str, window))}.onnx"


def cache_folder(checkpoint: Path | None) -> Path:
    """Beside the checkpoint where that folder is writable, else the user's cache (an installed or
    read-only model)."""
    if checkpoint is not None:
        folder = checkpoint.parent / CACHE_FOLDER
        try:
            folder.mkdir(exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    USER_CACHE.mkdir(parents=True, exist_ok=True)
    return USER_CACHE


def export_onnx(network: torch.nn.Module, window: tuple[int, ...], path: Path) -> Path:
    """``network`` (in eval mode, on the CPU) as ONNX for windows of shape ``window`` = (C, *spatial),
    any number of windows a call; written atomically, so a crash leaves no half file under the name."""
    module = unwrap(network).eval()
    device = next(module.parameters()).device
    example = torch.zeros((1, *window), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        with atomic_write(path) as handle, torch.no_grad():
            torch.onnx.export(
                module, (example,), handle, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "windows"}, OUTPUT_NAME: {0: "windows"}},
            )  # fmt: skip
    return path


def write_onnx(
    network: torch.nn.Module, window: tuple[int, ...], path: Path, metadata: Mapping[str, Any]
) -> float:
    """A deployable ONNX file: ``network`` exported for ``window`` with ``metadata`` (what the input
    must be, what the output means) in the model's ``metadata_props`` under ``medseg``, so Triton,
    MONAI Deploy or a PACS plug-in can run it without this project. Refused, naming the difference,
    when ONNX Runtime's softmax differs from PyTorch's by more than ``TOLERANCE``; returns that
    difference."""
    import onnx  # only here: editing a model's metadata is what the onnx package is needed for

    with atomic_path(path, keep_suffix=True) as staging:
        export_onnx(network, window, staging)
        model = onnx.load(str(staging))
        entry = model.metadata_props.add()
        entry.key, entry.value = "medseg", json.dumps({**onnx_facts(window), **metadata})
        onnx.save(model, str(staging))
        difference = softmax_difference(network, session("onnxruntime", staging), window)
        if difference > TOLERANCE:
            raise RuntimeError(
                f"{path}: ONNX Runtime's softmax differs from PyTorch's by {difference:.1e} (more than "
                f"{TOLERANCE:.0e}); the network was not written"
            )
    return difference


def onnxruntime_session(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeUnavailable("runtime onnxruntime needs the onnxruntime package") from error
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # as fast, and a third of a GiB less on a 96^3 unet3d window
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def openvino_session(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    try:
        import openvino
    except ImportError as error:
        raise RuntimeUnavailable("runtime openvino needs the openvino package") from error
    # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in bf16.
    settings = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = openvino.Core().compile_model(str(path), "CPU", settings)
    return lambda batch: compiled(batch)[0]


SESSIONS = {"onnxruntime": onnxruntime_session, "openvino": openvino_session}


def session(runtime: str, path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 window batch to its logits, on ``runtime``'s CPU kernels."""
    return SESSIONS[runtime](path, threads or torch.get_num_threads())


def softmax_difference(
    network: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray], window: tuple[int, ...]
) -> float:
    """The largest difference between PyTorch's and the runtime's softmax on a seeded window of
    standard-normal values (the range of a normalised image)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((1, *window), generator=generator)
    with torch.no_grad():
        expected = torch.softmax(unwrap(network).eval()(example.to(_device_of(network))).float().cpu(), 1)
    found = torch.softmax(torch.from_numpy(np.asarray(run(example.numpy()))).float(), 1)
    return float((found - expected).abs().max())


def _device_of(network: torch.nn.Module) -> torch.device:
    return next(network.parameters()).device


def checked_export(
    network: torch.nn.Module, runtime: str, checkpoint: Path | None, window: tuple[int, ...]
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, float]:
    """The runtime's session on the cached (or new) export, or None when its softmax differs from
    PyTorch's by more than ``TOLERANCE``; and that difference. Each runtime's difference is kept in
    the export's metadata (``<name>.json``), so a later run checks nothing again."""
    path = cache_folder(checkpoint) / export_name(unwrap(network), checkpoint, window)
    if not path.is_file():
        logger.info("exporting the network to ONNX for %s windows of %s: %s", runtime, window, path.name)
        export_onnx(network, window, path)
    run = session(runtime, path)
    facts = read_facts(path)
    difference = facts.get("softmax_difference", {}).get(runtime)
    if difference is None:
        difference = softmax_difference(network, run, window)
        facts.setdefault("softmax_difference", {})[runtime] = difference
        write_facts(path, {**onnx_facts(window), **facts})
    return (run if difference <= TOLERANCE else None), difference


def onnx_facts(window: tuple[int, ...]) -> dict[str, Any]:
    """The input and output format a deployment needs to run the file without this project."""
    return {
        "input": {"name": INPUT_NAME, "shape": ["windows", *window], "dtype": "float32",
                  "layout": "N, C, spatial axes in RAS order after the bundle's preprocessing"},
        "output": {"name": OUTPUT_NAME, "shape": ["windows", "classes", *window[1:]], "dtype": "float32",
                   "meaning": "logits; softmax over axis 1 gives class probabilities"},
        "opset": OPSET,
        "exported_with": {"torch": torch.__version__},
    }  # fmt: skip


def facts_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_facts(path: Path) -> dict[str, Any]:
    try:
        return json.loads(facts_path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_facts(path: Path, facts: Mapping[str, Any]) -> None:
    with atomic_write(facts_path(path)) as handle:
        handle.write((json.dumps(facts, indent=2) + "\n").encode())


class RuntimeNetwork(torch.nn.Module):
    """A network whose windows run through ONNX Runtime or OpenVINO; ``module`` is the PyTorch network
    (weights are loaded into it; it runs the windows itself when the runtime disagrees with it)."""

    def __init__(
        self,
        module: torch.nn.Module,
        runtime: str,
        checkpoint: str | Path | None = None,
        windows_per_call: int | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.runtime = runtime
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.windows_per_call = windows_per_call  # None: the batch as the sliding window gives it
        self._runs: dict[tuple[int, ...], Callable[[np.ndarray], np.ndarray] | None] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = tuple(x.shape[1:])
        if window not in self._runs:
            self._runs[window] = self._prepare(window)
        run = self._runs[window]
        if run is None:
            return self.module(x)
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.windows_per_call or len(batch)
        logits = [np.asarray(run(batch[start : start + step])) for start in range(0, len(batch), step)]
        return torch.from_numpy(np.concatenate(logits) if len(logits) > 1 else logits[0]).to(x.device)

    def _prepare(self, window: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray] | None:
        run, difference = checked_export(self.module, self.runtime, self.checkpoint, window)
        if run is None:
            logger.warning(
                "%s's softmax differs from PyTorch's by %.1e (more than %.0e) on this network: its windows "
                "go through PyTorch", self.runtime, difference, TOLERANCE,
            )  # fmt: skip
        return run
