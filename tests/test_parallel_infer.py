"""``medseg infer --nproc``: the cases split over worker processes give the segmentations one process
gives, each in its input's space; the failures of all workers and the refused inputs come back as one
list; a worker that dies fails its own cases only; the batch is one MLflow run."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_AFFINE, phantom, tiny, write_dataset
from mlflow.tracking import MlflowClient
from mlflow_artifacts import artifact_files, leaks
from model_factory import untrained_model

from pipeline.cli import main
from pipeline.inference import parallel
from pipeline.inference.batch import Failure, write_failures
from pipeline.inference.parallel import Worker, require_workers, run_workers, worker_environments
from pipeline.workflows import infer

BUNDLE = "resunet"
SETTINGS = tiny(BUNDLE)
SHAPES = [(24, 28, 20), (30, 26, 22), (20, 20, 24), (22, 24, 26)]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four volumes of different shapes and an unreadable one, segmented in one process and, through
    ``medseg infer --nproc 2``, by two workers (the fourth case's output blocked by a folder),
    tracked to a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("parallel")
    model = untrained_model(BUNDLE, write_dataset(root / "data", 1, (20, 20, 20)), root / "models")
    rng = np.random.default_rng(3)
    images = []
    for index, shape in enumerate(SHAPES):
        images.append(root / "in" / f"v{index}.nii.gz")
        images[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(phantom(shape, rng)[0], PHANTOM_AFFINE), images[-1])
    broken = root / "in" / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    infer(BUNDLE, images[:3], root / "one", model, SETTINGS, tracking=False)
    (root / "two" / "v3_seg.nii.gz").mkdir(parents=True)  # saving fails inside its worker
    uri = f"sqlite:///{root / 'mlruns.db'}"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(
            ["infer", BUNDLE, "--input", *map(str, [*images, broken]), "--output", str(root / "two"),
             "--checkpoint", str(model), "--nproc", "2", "--tracking-uri", uri,
             *(f"{key}={value}" for key, value in SETTINGS.items())]
        )  # fmt: skip
    return {
        "root": root,
        "images": images,
        "broken": broken,
        "status": status,
        "err": err.getvalue(),
        "uri": uri,
    }


def test_two_workers_segment_as_one_process_in_each_input_space(batch: dict) -> None:
    for image in batch["images"][:3]:
        name = image.name.replace(".nii.gz", "_seg.nii.gz")
        one, two = nib.load(batch["root"] / "one" / name), nib.load(batch["root"] / "two" / name)
        source = nib.load(image)
        assert two.shape == source.shape and np.allclose(two.affine, source.affine), name
        assert np.array_equal(np.asarray(two.dataobj), np.asarray(one.dataobj)), name


def test_failures_of_workers_and_refused_inputs_are_one_list(batch: dict) -> None:
    assert batch["status"] == 1
    report = batch["err"][batch["err"].index("medseg: error:") :]
    assert report.startswith("medseg: error: 2 of 5 cases could not be segmented")
    for case, why in ((batch["broken"], "cannot be read"), (batch["images"][3], "Is a directory")):
        assert f"  {case}: " in report and why in report.split(f"  {case}: ")[1].splitlines()[0], case
    assert "Traceback" not in report
    assert sorted(p.name for p in (batch["root"] / "two").glob("v[0-2]_seg.nii.gz")) == [
        f"v{index}_seg.nii.gz" for index in range(3)
    ]


def test_the_batch_is_one_mlflow_run_without_paths(batch: dict, tmp_path: Path) -> None:
    client = MlflowClient(batch["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("phantoms").experiment_id])
    params = run.data.params
    assert params["nproc"] == "2" and params["cases"] == "4" and params["network"] == "UNet"
    assert run.data.tags["workflow"] == "inference" and run.data.metrics["failed_cases"] == 1
    assert run.info.status == "FINISHED"
    files = artifact_files(client, run.info.run_id)
    assert any(path.startswith("config/config_") for path in files), files
    report = json.loads(
        Path(client.download_artifacts(run.info.run_id, "failed_cases.json", str(tmp_path))).read_text()
    )
    assert [row["case"] for row in report] == ["v3"] and "Is a directory" in report[0]["reason"]
    assert leaks(batch["uri"], [str(batch["root"])], tmp_path / "downloaded") == []


def test_a_worker_that_dies_fails_its_own_cases_only(tmp_path: Path) -> None:
    write_failures(tmp_path / "reported.json", [Failure("/data/b.nii.gz", "ValueError: bad")])
    dies = Worker([sys.executable, "-c", "raise SystemExit(3)"], {}, [{"image": "/data/a.nii.gz"}],
                  tmp_path / "never.json", "worker 1 of 2")  # fmt: skip
    reports = Worker([sys.executable, "-c", "raise SystemExit(1)"], {}, [{"image": "/data/b.nii.gz"}],
                     tmp_path / "reported.json", "worker 2 of 2")  # fmt: skip
    died, failed = run_workers([dies, reports], None, {}, tmp_path)
    assert died.case == "/data/a.nii.gz" and "worker 1 of 2 stopped (exit status 3)" in died.reason
    assert failed == Failure("/data/b.nii.gz", "ValueError: bad")


def test_workers_share_the_cores_or_take_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "usable_cores", lambda: 16)
    monkeypatch.setattr(parallel, "visible_gpus", lambda: [])
    assert [env["OMP_NUM_THREADS"] for env in worker_environments(3)] == ["5"] * 3
    assert "CUDA_VISIBLE_DEVICES" not in worker_environments(2)[0]
    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["4", "6"])
    assert [env["CUDA_VISIBLE_DEVICES"] for env in worker_environments(2)] == ["4", "6"]
    with pytest.raises(ValueError, match="has 2 GPU"):
        require_workers(3)
    with pytest.raises(ValueError, match="one worker process or more"):
        require_workers(0)
