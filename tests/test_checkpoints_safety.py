"""Checkpoints that cannot be used say which file and why; a full disk never costs the previous file;
loading runs no code; exported bundles carry no code from elsewhere; the MLflow UI stays local."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny
from model_factory import network, untrained_model
from test_tracking_server import free_port
from test_training_handlers import build_trainer

from pipeline.cli import main
from pipeline.export import check_portable, export_bundle
from pipeline.inference.weights import LoadWeights
from pipeline.io.atomic import DiskFullError
from pipeline.io.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.workflows import PROJECT_ROOT, require_fitting_checkpoint


def unreadable(folder: Path) -> dict[str, Path]:
    """Files that are not checkpoints, as a user might pass them by mistake."""
    good = save_atomic({"weights": torch.zeros(1000)}, folder / "good.pt")
    files = {
        "truncated": good.read_bytes()[:300],
        "zero_bytes": b"",
        "random_bytes": np.random.default_rng(0).bytes(5000),
        "json": json.dumps({"labels": {"0": "background"}}).encode(),
    }
    paths = {name: folder / f"{name}.pt" for name in files}
    for name, content in files.items():
        paths[name].write_bytes(content)
    paths["nifti"] = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), paths["nifti"])
    return paths


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    for path in unreadable(tmp_path).values():
        with pytest.raises(
            CheckpointError, match=rf"checkpoint {re.escape(str(path))} is truncated or not a checkpoint"
        ):
            load_checkpoint(path)


class _Planted:
    """Pickles to a call that creates a file: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_loading_a_checkpoint_runs_no_code_from_it(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    torch.save({"network": _Planted(marker)}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "latest.pt")
    assert not marker.exists()


def test_another_bundles_weights_name_the_file_and_the_first_difference(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    foreign = untrained_model("resunet", phantom_datalist, tmp_path / "resunet")
    with pytest.raises(CheckpointError) as error:
        LoadWeights(foreign, network("unet3d", phantom_datalist))()
    message = str(error.value)
    assert str(foreign) in message and "another network's weights" in message and "first:" in message


def test_other_network_settings_name_the_first_parameter_with_both_shapes(
    phantom_datalist: Path, tmp_path: Path
) -> None:
    wider = untrained_model("unet3d", phantom_datalist, tmp_path / "models", features=[8, 8, 16, 32, 64])
    expected = (
        r"model\.pt does not fit .*: parameter \S+ has shape 8x1x3x3x3 in the checkpoint and 4x1x3x3x3 in"
    )
    with pytest.raises(CheckpointError, match=expected):
        require_fitting_checkpoint("unet3d", wider, tiny("unet3d"))


def test_medseg_infer_refuses_a_wrong_checkpoint_in_one_line(
    phantom_datalist: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    foreign = untrained_model("resunet", phantom_datalist, tmp_path / "resunet")
    image = next((phantom_datalist.parent / "imagesTs").glob("*.nii.gz"))
    settings = [f"{key}={value}" for key, value in tiny("unet3d").items()]
    status = main(["infer", "unet3d", "--input", str(image), "--output", str(tmp_path / "out"),
                   "--checkpoint", str(foreign), "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
                   *settings])  # fmt: skip
    err = capfd.readouterr().err
    assert status == 2 and f"medseg: error: checkpoint {foreign} does not fit" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_training_state_gives_its_network_for_inference(phantom_datalist: Path, tmp_path: Path) -> None:
    weights = network("unet3d", phantom_datalist).state_dict()
    save_atomic({"network": weights, "trainer": {"iteration": 4}}, tmp_path / "latest.pt")
    shutil.copy(phantom_datalist, tmp_path / "dataset.json")
    assert require_fitting_checkpoint("unet3d", tmp_path / "latest.pt", tiny("unet3d")).is_file()


def fsync_disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operating system's answer when the data no longer fits (fsync reports delayed writes)."""

    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = save_atomic({"epoch": torch.tensor(1)}, tmp_path / "latest.pt")
    fsync_disk_full(monkeypatch)
    with pytest.raises(DiskFullError, match=f"disk full while writing {re.escape(str(target))}") as error:
        save_atomic({"epoch": torch.tensor(2)}, target)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"], "no temporary file left"


def test_disk_full_during_training_stops_it_with_the_last_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_trainer(tmp_path, max_epochs=1)[0].run()
    trainer, _ = build_trainer(tmp_path, max_epochs=3)
    fsync_disk_full(monkeypatch)
    with pytest.raises(DiskFullError, match="disk full while writing"):
        trainer.run()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "latest.pt")["trainer"]["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "model.pt"]


FULL_DISK = textwrap.dedent(
    """
    import json, subprocess, sys
    import nibabel as nib, numpy as np, torch
    from pipeline.inference.batch import AtomicImageWriter
    from pipeline.io.atomic import DiskFullError
    from pipeline.io.checkpoint import load_checkpoint, save_atomic
    folder = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", folder], check=True)
    result = {}
    save_atomic({"step": torch.tensor(1)}, f"{folder}/latest.pt")
    try:
        save_atomic({"step": torch.tensor(2), "weights": torch.zeros(200_000)}, f"{folder}/latest.pt")
    except DiskFullError as error:
        result["checkpoint"] = str(error)
    result["kept"] = int(load_checkpoint(f"{folder}/latest.pt")["step"])
    writer = AtomicImageWriter()
    writer.set_data_array(np.random.rand(1, 80, 80, 80).astype(np.float32), channel_dim=0)
    writer.set_metadata({"affine": np.eye(4)})
    try:
        writer.write(f"{folder}/case_seg.nii.gz")
    except DiskFullError as error:
        result["prediction"] = str(error)
    import os
    result["files"] = sorted(os.listdir(folder))
    print(json.dumps(result))
    """
)


def test_a_real_full_filesystem(tmp_path: Path) -> None:
    """A 256 KiB tmpfs in a private mount namespace, where the kernel permits one."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    if subprocess.run([*namespace, "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged mount namespaces are not permitted here")
    (tmp_path / "small").mkdir()
    result = subprocess.run(
        [*namespace, sys.executable, "-c", FULL_DISK, str(tmp_path / "small")],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["checkpoint"] == f"disk full while writing {tmp_path / 'small'}/latest.pt"
    assert found["prediction"] == f"disk full while writing {tmp_path / 'small'}/case_seg.nii.gz"
    assert found["kept"] == 1 and found["files"] == ["latest.pt"], "previous file kept, no temporary left"


def test_an_exported_bundle_ships_only_this_project_code_and_imports_only_declared_packages(
    tmp_path: Path,
) -> None:
    """Its code is scripts/, copies of this package's own modules (as the model zoo ships a bundle's
    components); nothing else that could run."""
    exported = export_bundle("unet3d", tmp_path / "unet3d")
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    other = [f for f in files if not f.endswith((".json", ".conf", ".md")) and not f.startswith("scripts/")]
    assert other == ["LICENSE", "large_files.yml"], files
    package = PROJECT_ROOT / "pipeline"
    for script in (f for f in files if f.startswith("scripts/")):
        module = Path(script).relative_to("scripts")
        assert script.endswith(".py") and (package / module).is_file(), f"{script} is not this package's code"
    declared = {
        "os",
        "numpy",
        "torch",
        "monai",
        "pipeline",  # training only: it needs the package (the export's README says so)
        "scripts",
    }  # the standard library's os, and metadata's packages
    for config in (exported / "configs").glob("*.json"):
        text = config.read_text()
        imports = set(re.findall(r'"\$import ([\w.]+)"', text)) | set(re.findall(r'"\$from ([\w.]+)', text))
        assert {name.split(".")[0] for name in imports} <= declared, (config.name, imports)
        assert not re.search(r'"%[^"]*\.(json|ya?ml)', text), f"{config.name} pulls in another config file"


@pytest.mark.parametrize("value", ["%../../other.yaml::network_def", "$exec(open('../train.py').read())"])
def test_an_export_that_would_run_code_from_outside_is_refused(value: str, tmp_path: Path) -> None:
    (tmp_path / "inference.json").write_text(json.dumps({"network_def": value}))
    with pytest.raises(ValueError, match="refers outside the exported bundle"):
        check_portable(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"network_def": "$__import__('os').system('touch pwned')"},
        {"imports": ["$import subprocess"]},
        {"network_def": {"_target_": "subprocess.run", "args": ["touch", "pwned"]}},
        {"network_def": "$torch.hub.load('someone/repo', 'model')"},
    ],
)
def test_an_export_runs_only_code_its_bundle_ships(config: dict, tmp_path: Path) -> None:
    """No path in these: only the rule that exported code is the bundle's own code refuses them."""
    (tmp_path / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"inference\.json runs code that is in none of the bundle's own"):
        check_portable(tmp_path, "unet3d")
    shipped = {"ckpt_dir": "$@bundle_root + '/models'", "network_def": {"_target_": "DynUNet"}}
    (tmp_path / "inference.json").write_text(json.dumps(shipped))
    check_portable(tmp_path, "unet3d")


def test_mlflow_ui_serves_only_this_machine_unless_asked() -> None:
    def command(*extra: str) -> str:
        dry = subprocess.run(
            ["make", "-n", "mlflow-ui", *extra], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        return dry.stdout

    if shutil.which("make") is None:
        pytest.skip("no make")
    assert "--host 127.0.0.1 " in command()
    assert "--host 0.0.0.0 " in command("MLFLOW_HOST=0.0.0.0")


def test_make_mlflow_ui_serves_the_ui_on_localhost(tmp_path: Path) -> None:
    """The very command ``make mlflow-ui`` runs, on a free port and against a store in tmp_path."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    port = free_port()
    dry = subprocess.run(
        ["make", "-n", "mlflow-ui", f"MLFLOW_PORT={port}"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    (line,) = [line for line in dry.stdout.replace("\\\n", " ").splitlines() if "mlflow ui " in line]
    command = shlex.split(line.replace(str(PROJECT_ROOT / "mlflow"), str(tmp_path)))
    assert command[command.index("--host") + 1] == "127.0.0.1"
    server = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        page = fetch_when_up(f"http://127.0.0.1:{port}/", server)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert "mlflow" in page.lower() and (tmp_path / "mlruns.db").is_file()


def fetch_when_up(url: str, server: subprocess.Popen, seconds: float = 180) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode(errors="replace")
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer (server exit code {server.poll()})")
