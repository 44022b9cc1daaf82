"""``compile: true`` (torch.compile, in place) for training and inference.

Checkpoints hold the bare network's keys whatever wrapped it (DistributedDataParallel, a compiled
module), and weights load whatever prefixes a wrapper left (``module.``, ``_orig_mod.``), into an
eager or a compiled network; a resume crosses compile on and off; a compiled bundle network computes
what the eager one does; a machine without a compiler stops the run before it starts. Compiling on a
CPU takes tens of seconds: one test compiles in the normal tier, the real training is a long one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.data import MetaTensor

from pipeline.bundle_parser import bundle_parser
from pipeline.data.datalist import cases
from pipeline.io.checkpoint import load_checkpoint, load_network_weights, save_atomic, unwrap
from pipeline.networks import compile_in_place, compile_problem, to_device
from pipeline.planning.auto import training_config
from pipeline.training import TrainingCheckpoints
from pipeline.workflows import infer, train

# unet3d at its smallest (two down-samplings, no deep supervision, 16^3 windows): the fewest operations
# to compile, so that the one compiling test of the normal tier stays near half a minute.
SMALL_UNET3D = {"features": [4, 8, 16], "strides": [2, 2], "deep_supervision": False, "patch_size": [16] * 3}
HEADER = {"name": "compile", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ"}}
IN_PLACE = "compiled in place"  # the bundles' way, which checks for a compiler first
PREFIXES = ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
WRAPPERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "eager": lambda network: network,
    IN_PLACE: lambda network: compile_in_place(network, "cpu"),
    "torch.compile": torch.compile,
    "DataParallel of torch.compile": lambda network: torch.nn.DataParallel(torch.compile(network)),
    "torch.compile of DataParallel": lambda network: torch.compile(torch.nn.DataParallel(network)),
}  # none of them is called: wrapping compiles nothing until the first forward
needs_compiler = pytest.mark.skipif(
    compile_problem("cpu") is not None, reason="no C++ compiler for torch.compile's CPU kernels"
)


def wrappers(*names: str) -> list:
    """``names`` as parameters, the in-place compilation skipped where no compiler is."""
    return [pytest.param(name, marks=needs_compiler) if name == IN_PLACE else name for name in names]


def tiny_network(seed: int) -> torch.nn.Module:
    """A convolution, a batch norm (buffers and its version metadata) and an output convolution."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.Conv3d(4, 2, 1)
    )


def finished_engine() -> Engine:
    """An ignite engine after one epoch of two iterations: a state to save and to resume into."""
    engine = Engine(lambda _engine, _batch: None)
    engine.run([0, 1], max_epochs=1)
    return engine


def stepped_optimizer(network: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW after one step, so that its per-parameter state (moments) must survive a resume."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network(torch.randn(2, 1, 4, 4, 4)).sum().backward()
    optimizer.step()
    return optimizer


def same_weights(network: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = unwrap(network).state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("how", wrappers(*WRAPPERS))
def test_checkpoints_hold_the_bare_networks_keys(how: str, tmp_path: Path) -> None:
    network = tiny_network(0)
    plain = list(network.state_dict())
    optimizer = torch.optim.AdamW(network.parameters())
    handler = TrainingCheckpoints(tmp_path, WRAPPERS[how](network), optimizer, stop_on_signals=False)
    handler.save_model()
    handler.save_latest(finished_engine())
    assert list(load_checkpoint(tmp_path / "model.pt")) == plain  # a bare state dict, as the model zoo's
    assert list(load_checkpoint(tmp_path / "latest.pt")["network"]) == plain


@needs_compiler
def test_under_distributed_data_parallel_the_saved_keys_are_plain(tmp_path: Path) -> None:
    """multi_gpu_train.yaml's order, DDP around the network compiled in place, in a one-process group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        network = tiny_network(0)
        wrapped = torch.nn.parallel.DistributedDataParallel(to_device(network, "cpu", True, True))
        assert all(key.startswith("module.") for key in wrapped.state_dict())
        optimizer = torch.optim.AdamW(wrapped.parameters())
        TrainingCheckpoints(tmp_path, wrapped, optimizer, stop_on_signals=False).save_model()
    finally:
        dist.destroy_process_group()
    assert list(load_checkpoint(tmp_path / "model.pt")) == list(network.state_dict())


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("how", wrappers("eager", IN_PLACE, "torch.compile"))
def test_prefixed_weights_load_into_an_eager_or_compiled_network(
    prefix: str, how: str, tmp_path: Path
) -> None:
    """Older or foreign checkpoints, saved from a wrapped network's own state dict."""
    expected = tiny_network(1).state_dict()
    foreign = save_atomic({prefix + key: value for key, value in expected.items()}, tmp_path / "foreign.pt")
    target = WRAPPERS[how](tiny_network(2))
    assert load_network_weights(target, foreign) is target
    assert same_weights(target, expected)


def test_a_network_whose_first_module_is_named_module_keeps_its_keys(tmp_path: Path) -> None:
    class Holder(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.module = tiny_network(seed)

    expected = Holder(1).state_dict()
    assert all(key.startswith("module.") for key in expected)
    own = save_atomic(expected, tmp_path / "own.pt")
    parallel = save_atomic(torch.nn.DataParallel(Holder(1)).state_dict(), tmp_path / "parallel.pt")
    for path in (own, parallel):  # "module.module.": one prefix comes off, the network's own stays
        target = Holder(2)
        load_network_weights(target, path)
        assert same_weights(target, expected), path.name


CROSSINGS = [("eager", "torch.compile"), ("torch.compile", "eager"), (IN_PLACE, "eager"), ("eager", IN_PLACE)]


@pytest.mark.parametrize(
    ("saved_by", "resumed_by"),
    [pytest.param(*pair, marks=needs_compiler) if IN_PLACE in pair else pair for pair in CROSSINGS],
)
def test_a_resume_crosses_compile_on_and_off(saved_by: str, resumed_by: str, tmp_path: Path) -> None:
    """``latest.pt`` with the optimiser's moments, saved with compile on and resumed with it off, and
    the other way round (the optimiser's state is by parameter position, the network's by plain key)."""
    source = tiny_network(0)
    optimizer = stepped_optimizer(source)
    saver = TrainingCheckpoints(tmp_path, WRAPPERS[saved_by](source), optimizer, stop_on_signals=False)
    saver.save_latest(finished_engine())
    target = tiny_network(1)
    target_optimizer = torch.optim.AdamW(target.parameters(), lr=1e-3)
    wrapped = WRAPPERS[resumed_by](target)
    TrainingCheckpoints(tmp_path, wrapped, target_optimizer, stop_on_signals=False).resume(finished_engine())
    assert same_weights(target, source.state_dict())
    pairs = list(zip(target.parameters(), source.parameters(), strict=True))
    moments = [
        (target_optimizer.state[mine]["exp_avg"], optimizer.state[saved]["exp_avg"]) for mine, saved in pairs
    ]
    assert len(moments) == 6 and all(torch.equal(mine, saved) for mine, saved in moments)


def test_without_a_compiler_the_run_stops_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    network = tiny_network(0)
    with pytest.raises(RuntimeError, match=r"compile: true, but no C\+\+ compiler \(g\+\+\) is on PATH"):
        to_device(network, "cpu", channels_last=True, compiled=True)
    assert network._compiled_call_impl is None
    keys = {**SMALL_UNET3D, "dataset_info": HEADER, "compile": True, "runtime": "torch"}  # others export
    parser = bundle_parser("unet3d", "inference", keys)
    with pytest.raises(RuntimeError) as raised:  # MONAI's parser wraps it: the sentence is in the chain
        parser.get_parsed_content("network")
    assert "or run with compile: false" in "".join(str(e) for e in (raised.value, raised.value.__cause__))


def bundle_network(compiled: bool) -> torch.nn.Module:
    overrides = {**SMALL_UNET3D, "dataset_info": HEADER, "compile": compiled, "runtime": "torch"}
    return bundle_parser("unet3d", "inference", overrides).get_parsed_content("network").eval()


@needs_compiler
def test_a_compiled_bundle_network_computes_what_the_eager_one_does() -> None:
    """Through base.yaml's ``compile`` key, with a MetaTensor batch as the training loader gives."""
    compiled, eager = bundle_network(True), bundle_network(False)
    assert type(compiled) is type(eager) and compiled._compiled_call_impl is not None
    eager.load_state_dict(compiled.state_dict())  # the same keys: compiling in place adds no prefix
    windows = MetaTensor(torch.randn(2, 1, *SMALL_UNET3D["patch_size"]))
    with torch.no_grad():
        torch.testing.assert_close(compiled(windows), eager(windows).as_tensor(), rtol=0, atol=1e-4)


@pytest.mark.long
@needs_compiler
def test_a_compiled_training_resumes_eagerly_and_its_model_segments_eagerly(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    settings = {**SMALL_UNET3D, "spacing": [2.0, 2.0, 2.0], "num_workers": 0, "sw_batch_size": 2}
    compiled = {**settings, "compile": True}
    models = train("unet3d", phantom_datalist, tmp_path, 1, compiled, tracking=False, plan=False)
    plain = list(bundle_network(False).state_dict())
    assert list(load_checkpoint(models / "latest.pt")["network"]) == plain
    assert list(load_checkpoint(models / "model.pt")["network"]) == plain
    train("unet3d", phantom_datalist, tmp_path, 2, settings, tracking=False, plan=False)
    latest = load_checkpoint(models / "latest.pt")
    assert latest["trainer"]["iteration"] == 2 * latest["trainer"]["epoch_length"]
    image = cases(phantom_datalist, role="test")[0]["image"]
    out = infer(
        "unet3d", [image], tmp_path / "seg", models / "model.pt", {**settings, "compile": False}, False
    )
    (segmentation,) = out.glob("*_seg.nii.gz")
    assert nib.load(segmentation).shape == nib.load(image).shape


def test_compile_and_runtime_are_the_run_s_own_not_the_model_s() -> None:
    """A compiled training's model.pt must not make its inference compile (a machine without a C++
    compiler would refuse it), nor fix its runtime."""
    kept = training_config(None, {"compile": True, "runtime": "openvino", "patch_size": [32, 32, 32]})
    assert "compile" not in kept and "runtime" not in kept
    assert kept["patch_size"] == [32, 32, 32]
