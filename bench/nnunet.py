"""nnU-Net v2 as the speed peer of ``make bench BENCH_ARGS=--nnunet``: the same CT volume through
``nnUNetv2_predict`` (3d_fullres, fold 0, no TTA, CPU), timed like ours (``bench/sampling.py``).

nnU-Net pins its own dependency stack (timm, batchgenerators, dynamic-network-architectures), so it
lives in its own virtual environment, created on first use under the git-ignored ``data/cache``.
Its model is planned on the bench's training datalist and trained for a few iterations only: the
timing depends on the plan (patch size, network, target spacing), not on the weights. The venv,
the raw and preprocessed datasets and the model are cached; a second run reuses them all (remove
``data/cache/nnunet/<datalist>`` to plan and train again, ``data/cache/nnunet-venv`` to reinstall).

The timed inference is ``nnUNetv2_predict -i <folder> -o <out> -d 500 -c 3d_fullres -f 0
--disable_tta -device cpu`` through the same predictor call, with our thread count and the network
sampled (``bench/nnunet_side.py`` says how). On the ``--quick`` volume nnU-Net's time is mostly its
worker processes starting (each imports torch), and its network is full-size against our tiny
quick ones: a smoke test of the path, not a comparison.

This module runs in our venv (the standard library and ``bench.machine``); ``bench/nnunet_side.py``
runs in nnU-Net's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.machine import tree_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache"  # git-ignored
VENV = CACHE / "nnunet-venv"
HOME = CACHE / "nnunet"
DATASET_ID = 500
DATASET_NAME = f"Dataset{DATASET_ID:03d}_BenchCT"
CONFIGURATION = "3d_fullres"
TORCH = "torch==2.13.0"  # resolves to the local CPU build; a bare `torch` would pull a CUDA one
TORCHVISION = "torchvision==0.28.0"  # the release built against torch 2.13; --no-deps keeps our torch
INSTALLED = ".bench-installed"  # written last, so an interrupted install starts over
PLANNED = ".bench-planned"  # likewise for planning and preprocessing
TRAINER_FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
TRAIN_ITERATIONS = 2  # nnU-Net's epoch is 250 iterations: hours on a 2-core CPU, and timing needs none


# --- the virtual environment ----------------------------------------------------------------------


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def install_steps(python: Path) -> list[list[str]]:
    """The pip commands in order: CPU torch first, so neither torchvision nor nnunetv2 (which pulls
    torchvision through timm) can bring in a CUDA torch. ``-qq``: pip's warnings about the local
    index's missing folders would bury what matters."""
    pip = [str(python), "-m", "pip", "install", "-qq"]
    return [[*pip, TORCH], [*pip, TORCHVISION, "--no-deps"], [*pip, "nnunetv2"]]


def torch_versions(pip_list: str) -> dict[str, str]:
    """``{"torch": "2.13.0+cpu", ...}`` from ``pip list`` output, for the packages named torch*."""
    rows = (line.split() for line in pip_list.splitlines())
    return {row[0].lower(): row[1] for row in rows if len(row) >= 2 and row[0].lower().startswith("torch")}


def check_cpu_torch(pip_list: str, venv: Path = VENV) -> None:
    """Refuse a venv whose torch is not the CPU build we asked for: its timings would not compare."""
    found = torch_versions(pip_list).get("torch")
    if found != TORCH.split("==")[1] + "+cpu":
        raise RuntimeError(
            f"the nnU-Net venv has torch {found!r}, not {TORCH}+cpu: something pulled another build. "
            f"Remove {venv} and rerun; the torch wheel must come from the local index."
        )


def guard_fake_registrations(source: str) -> str:
    """torchvision's wheels are built against CUDA torch: on CPU torch its ``_C`` ops library does not
    load (it needs libtorch_cuda), which torchvision tolerates everywhere except two unguarded
    ``@torch.library.register_fake("torchvision::nms"/"qnms")`` decorators that make ``import
    torchvision`` (hence ``import timm``, hence nnU-Net's trainer lookup) fail with "operator
    torchvision::nms does not exist". Guard them as torchvision guards its other meta kernels; the
    ops stay unusable on CPU torch, as before, and nnU-Net never calls them."""
    pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.MULTILINE)
    guarded = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else lambda fn: fn)"
    return pattern.sub(guarded, source)


def make_torchvision_importable(python: Path, log_file: Path) -> None:
    """Patch torchvision's ``_meta_registrations.py`` in nnU-Net's venv if, and only if, its import fails."""
    if subprocess.run([str(python), "-c", "import torchvision"], capture_output=True).returncode == 0:
        return
    where = "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])"
    folder = subprocess.run([str(python), "-c", where], capture_output=True, text=True, check=True)
    module = Path(folder.stdout.strip()) / "_meta_registrations.py"
    module.write_text(guard_fake_registrations(module.read_text()))
    log(f"patched {module}: its fake-kernel registrations wait for the ops CPU torch cannot load")
    run_logged([str(python), "-c", "import torchvision, timm"], log_file)


def ensure_venv(venv: Path = VENV) -> tuple[Path, float | None]:
    """nnU-Net's venv, created on first use (minutes of download); its python and the seconds taken
    (None when it was already there)."""
    python = venv_python(venv)
    if (venv / INSTALLED).is_file():
        return python, None
    started = time.perf_counter()
    log(f"creating its venv in {venv} (first use only; minutes)")
    log_file = venv.parent / "nnunet-venv-install.log"
    # our interpreter's base python: 3.11, the ABI of the local torch wheel
    run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log_file)
    for step in install_steps(python):
        log("pip install " + " ".join(step[5:]))
        run_logged(step, log_file)
    listing = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True)
    check_cpu_torch(listing.stdout, venv)
    make_torchvision_importable(python, log_file)
    (venv / INSTALLED).write_text(json.dumps(torch_versions(listing.stdout)) + "\n")
    return python, time.perf_counter() - started


# --- the dataset, the plan and the model ---------------------------------------------------------


def case_id(image: str | Path) -> str:
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def dataset_json(datalist: Mapping[str, Any]) -> dict[str, Any]:
    """nnU-Net's ``dataset.json`` for our datalist: label names to values (ours maps values to names)."""
    return {
        "name": DATASET_NAME,
        "description": "bench/volumes.py CT-like volumes, for timing",
        "channel_names": dict(datalist["modality"]),
        "labels": {name: int(value) for value, name in datalist["labels"].items()},
        "numTraining": len(datalist["training"]),
        "file_ending": ".nii.gz",
    }


def write_raw_dataset(datalist_path: Path, raw: Path) -> Path:
    """``<raw>/DatasetNNN_BenchCT/{imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json}``
    from every labelled case of the datalist; ``dataset.json`` is written last, as the completion mark."""
    folder = raw / DATASET_NAME
    if (folder / "dataset.json").is_file():
        return folder
    datalist = json.loads(datalist_path.read_text())
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in datalist["training"]:
        name = case_id(case["image"])
        shutil.copyfile(case["image"], folder / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copyfile(case["label"], folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps(dataset_json(datalist), indent=2) + "\n")
    return folder


def home_for(train_datalist: Path) -> Path:
    """One nnU-Net home (raw, preprocessed, results) per training datalist: --quick's tiny volumes and
    the full-size ones get their own plans and models, both kept."""
    return HOME / train_datalist.stem


def environment(home: Path, **extra: str) -> dict[str, str]:
    """The environment with nnU-Net's three folders set (its paths module reads them at import)."""
    folders = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
    return {**os.environ, **{key: str(home / sub) for key, sub in folders.items()}, **extra}


def plan(python: Path, home: Path) -> float | None:
    """``nnUNetv2_plan_and_preprocess`` for 3d_fullres, once; seconds taken, None when cached."""
    marker = home / "preprocessed" / DATASET_NAME / PLANNED
    if marker.is_file():
        return None
    started = time.perf_counter()
    processes = str(min(4, os.cpu_count() or 1))
    command = [str(python.parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
               "-c", CONFIGURATION, "--verify_dataset_integrity", "-np", processes, "-npfp", processes,
               "--no_pbar"]  # fmt: skip
    log(f"planning and preprocessing {DATASET_NAME} ({CONFIGURATION})")
    run_logged(command, home / "logs" / "plan.log", environment(home))
    marker.write_text("")
    return time.perf_counter() - started


def checkpoint(home: Path) -> Path:
    """Where ``nnUNetv2_predict -d NNN -c 3d_fullres -f 0`` looks for the model."""
    return home / "results" / DATASET_NAME / TRAINER_FOLDER / "fold_0" / "checkpoint_final.pth"


def train(python: Path, home: Path, threads: int) -> float | None:
    """A few iterations of fold 0 (``bench/nnunet_side.py train``), once; seconds taken, None when cached."""
    if checkpoint(home).is_file():
        return None
    started = time.perf_counter()
    log(f"training fold 0 for {TRAIN_ITERATIONS} iterations (its accuracy does not matter for timing)")
    command = [*side(python), "train", "--dataset", str(DATASET_ID), "--iterations", str(TRAIN_ITERATIONS),
               "--threads", str(threads)]  # fmt: skip
    # data augmentation in the main process: a few iterations do not repay starting workers, and the
    # CPUs are shared (planning must not see this: it passes the value to torch.set_num_threads)
    run_logged(command, home / "logs" / "train.log", environment(home, nnUNet_n_proc_DA="0"))
    return time.perf_counter() - started


# --- timing ---------------------------------------------------------------------------------------


def side(python: Path) -> list[str]:
    """``bench/nnunet_side.py`` as a module of the project (it imports ``bench.sampling``)."""
    return [str(python), "-m", "bench.nnunet_side"]


def predict(python: Path, home: Path, image: str, work: Path, sample_calls: int, threads: int) -> dict:
    """nnU-Net's inference of ``image`` (``bench/nnunet_side.py predict``), with the process tree's
    peak memory sampled from here as ours is (proportional set size)."""
    result = work / "result.json"
    command = [*side(python), "predict", "--dataset", str(DATASET_ID), "--image", str(image),
               "--output-dir", str(work / "output"), "--sample-calls", str(sample_calls),
               "--threads", str(threads), "--result", str(result)]  # fmt: skip
    peak = run_logged(command, work / "predict.log", environment(home))
    return {**json.loads(result.read_text()), "peak_mem_gib": round(peak / 2**30, 2)}


def peer(image: str, train_datalist: Path, work: Path, sample_calls: int, threads: int) -> dict[str, Any]:
    """The whole peer: venv, dataset, plan and model (each cached), then the timed inference."""
    home = home_for(train_datalist)
    python, venv_s = ensure_venv()
    write_raw_dataset(train_datalist, home / "raw")
    setup = {"venv_s": venv_s, "plan_s": plan(python, home), "train_s": train(python, home, threads)}
    log(f"timing the inference of {Path(image).name}")
    result = predict(python, home, image, work, sample_calls, threads)
    setup = {key: None if value is None else round(value, 1) for key, value in setup.items()}
    # relative to the project: results.json is shared in notes, and an absolute path names the machine
    return {**result, "setup": setup, "checkpoint": str(checkpoint(home).relative_to(ROOT))}


def row_fields(result: Mapping[str, Any], ours_seconds: float) -> dict[str, Any]:
    """A bundle row's nnU-Net columns: its seconds, its megavoxels per second, and ``vs_nnunet`` (its
    seconds over ours on the same volume, so per voxel too: above 1, ours is faster)."""
    seconds = result["seconds"]
    return {
        "nnunet_s": round(seconds, 2),
        "mvox_per_s_nnunet": round(result["voxels"] / seconds / 1e6, 3),
        "vs_nnunet": round(seconds / ours_seconds, 3) if ours_seconds else None,
    }


def summary(result: Mapping[str, Any]) -> str:
    """The table's line for nnU-Net (one model serves every bundle's comparison)."""
    return (
        f"nnU-Net v{result['version']} {CONFIGURATION} fold 0, no TTA, CPU: {result['seconds']:.2f} s, "
        f"{result['windows']} windows of {result['patch_size']} at spacing {result['spacing']} "
        f"({result['seconds_per_window']:.3f} s each; {result['outside_network_s']} s outside the network), "
        f"{result['voxels'] / result['seconds'] / 1e6:.3f} Mvox/s, peak {result['peak_mem_gib']} GiB"
    )


# --- processes ------------------------------------------------------------------------------------


def run_logged(command: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` with its output in ``log_file``; the process tree's peak memory in bytes, sampled
    every 250 ms. A failure raises with the log's last lines, not the whole of nnU-Net's chatter."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    peak = 0
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.25)
    if process.returncode:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise RuntimeError(f"{command[0]} failed (exit {process.returncode}); end of {log_file}:\n{tail}")
    return peak


def log(message: str) -> None:
    print(f"bench: nnU-Net: {message}", file=sys.stderr, flush=True)
