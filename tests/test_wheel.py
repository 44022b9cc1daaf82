"""The wheel works outside the checkout: built from the tracked files, installed (not editable) into
a fresh virtual environment that borrows only the dependencies of the development one, and run from
a folder that is not the checkout, as a user of ``pip install medseg-pipeline`` would run it.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import tiny, write_dataset

from pipeline.paths import PROJECT_ROOT, available_bundles

pytestmark = pytest.mark.long


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(command)}\n{output[-4000:]}"
    return output


def source_copy(target: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored), symlinks kept as symlinks."""
    if not (PROJECT_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the source")
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listing.stdout.decode().split("\0")):
        source, copy = PROJECT_ROOT / name, target / name
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the work tree, not yet in the index
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, copy)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = source_copy(root / "source")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    run([*command, "-w", str(root / "dist")], root, dict(os.environ))
    (found,) = (root / "dist").glob("medseg_pipeline-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed first, into an empty venv; only then the development venv's site-packages
    are made visible (a .pth line, so its editable install's finder is never run), behind the wheel."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(folder)], folder.parent, dict(os.environ))
    python = folder / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    run([*pip, str(wheel)], folder.parent, dict(os.environ))
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """No setting of the development session leaks in (PYTHONPATH, MLFLOW_TRACKING_URI, MEDSEG_HOME)."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "MLFLOW", "MEDSEG"))
    }
    return {**env, "HOME": str(tmp_path)}


def test_the_wheel_holds_the_package_and_bundles_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("pipeline/", "medseg_pipeline-")) for n in names), "no tests, outputs or data"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/models/" in n]
    for bundle in available_bundles():
        for file in ("base.yaml", "train.yaml", "logging.conf", "common_metadata.json", "model.yaml"):
            assert f"pipeline/bundles/{bundle}/configs/{file}" in names, (bundle, file)
        assert f"pipeline/bundles/{bundle}/docs/README.md" in names
    shared = zipfile.ZipFile(wheel).read("pipeline/bundles/unet3d/configs/train.yaml")
    assert shared == (PROJECT_ROOT / "bundles" / "common" / "train.yaml").read_bytes(), "a copy, not a link"


def test_the_installed_package_runs_outside_the_checkout(venv: Path, user_env: dict, tmp_path: Path) -> None:
    python, medseg = venv / "bin" / "python", venv / "bin" / "medseg"
    work = tmp_path / "work"
    work.mkdir()
    probe = "import pipeline, pipeline.paths as p, pipeline.tracking as t; "
    probe += "print(pipeline.__file__, p.BUNDLES_DIR, t.git_commit())"
    found = run([str(python), "-c", probe], work, user_env).split()
    assert all(Path(path).is_relative_to(venv) for path in found[:2]), found
    assert found[2] == "medseg-pipeline==0.1.0", "outside a checkout a run names the package version"

    listed = run([str(medseg), "bundles"], work, user_env)
    assert all(bundle in listed for bundle in available_bundles())

    datalist = write_dataset(work / "data", num_cases=2, shape=(32, 32, 32))
    overrides = [f"{key}={json.dumps(value)}" for key, value in tiny("unet3d").items()]
    train = [str(medseg), "train", "unet3d", "--data", str(datalist), "--epochs", "1", "--output", "run"]
    output = run([*train, "--no-plan", *overrides], work, user_env)
    assert "Not all config files" not in output
    assert (work / "run" / "models" / "model.pt").is_file()
    assert (work / "mlflow" / "mlruns.db").is_file(), "an installed package tracks into the working folder"
    assert not list(venv.rglob("mlruns.db")) and not list(venv.rglob("models/model.pt"))

    infer = [str(medseg), "infer", "unet3d", "--input", "data/imagesTs", "--output", "segmented"]
    run([*infer, "--checkpoint", "run/models/model.pt", *overrides], work, user_env)
    assert (work / "segmented" / "case_002_seg.nii.gz").is_file()

    options = run([str(medseg), "config-files", "unet3d", "inference"], work, user_env).split()
    assert all(Path(path).is_relative_to(venv) for path in ast.literal_eval(options[3]))
    settings = [f"--{key}={value!r}" for key, value in tiny("unet3d").items()]
    plain = [str(python), "-m", "monai.bundle", "run", *options, "--input", "['data/imagesTs']"]
    output = run([*plain, "--output_dir", "plain", "--ckpt_dir", "run/models", *settings], work, user_env)
    assert "Not all config files" not in output
    assert (work / "plain" / "case_002_seg.nii.gz").is_file()
