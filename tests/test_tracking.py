"""Where runs go and how they are named, against a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import fire
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import add_to_run, default_tracking_uri, new_run_name
from pipeline.tracking.store import local_store
from pipeline.workflows import command_line_value


def test_run_names_never_repeat() -> None:
    names = {new_run_name("unet3d-train") for _ in range(20)}
    assert len(names) == 20 and all(name.startswith("unet3d-train-") for name in names)


def test_tracking_uri_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri() == f"sqlite:///{local_store()}"


def test_files_and_tags_reach_the_named_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo-data", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="unet3d-evaluate-1")
    report = tmp_path / "per_case.csv"
    report.write_text("case,dice_mean\na,0.9\n")
    run_id = add_to_run("demo-data", "unet3d-evaluate-1", [report], {"training_run": "unet3d-train-1"}, uri)
    assert run_id == run.info.run_id
    assert [a.path for a in client.list_artifacts(run_id)] == ["per_case.csv"]
    assert client.get_run(run_id).data.tags["training_run"] == "unet3d-train-1"
    with pytest.raises(ValueError, match="no MLflow run named 'other'"):
        add_to_run("demo-data", "other", tracking_uri=uri)


def test_a_run_name_with_a_quote_is_found(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo-data", artifact_location=(tmp_path / "artifacts").as_uri())
    for name in ("jane's run", 'the "best" run'):
        run = client.create_run(experiment, run_name=name)
        assert add_to_run("demo-data", name, tags={"checked": "yes"}, tracking_uri=uri) == run.info.run_id


@pytest.mark.parametrize("value", ["exp,1", "2024", "it's", 'say "hi"', "$@x + 1", "/data/a b.nii.gz"])
def test_multi_gpu_overrides_reach_the_bundle_as_given(value: str) -> None:
    """``launch_distributed`` hands overrides to ``monai.bundle run``, which parses them with python-fire."""
    received = fire.Fire(lambda **kwargs: kwargs, command=["--run_name", command_line_value(value)])
    assert received == {"run_name": value}
    numbers = fire.Fire(lambda **kwargs: kwargs, command=["--patch_size", command_line_value([32, 32, 16])])
    assert numbers == {"patch_size": [32, 32, 16]}


def test_a_mid_epoch_checkpoint_sends_the_losses_it_covers(tmp_path: Path) -> None:
    """MLflow's series reach at least as far as ``latest.pt``: a resume from a mid-epoch checkpoint
    (after a SIGKILL) then leaves no gap. Metrics are buffered until an epoch ends, so without the
    flush before a mid-epoch save nothing of the first epoch would be sent by its third iteration."""
    from ignite.engine import Events
    from monai.handlers import from_engine
    from test_training_handlers import build_trainer

    from pipeline.tracking import RunTracker

    trainer, _ = build_trainer(tmp_path / "models", max_epochs=1, cases=8, every_minutes=0)  # 4 iterations
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = RunTracker(
        tracking_uri=uri,
        experiment_name="mid-epoch",
        run_name="mid-epoch-run",
        iteration_log=True,
        epoch_log=False,
        tag_name="train_loss",
        output_transform=from_engine(["loss"], first=True),
    )
    tracker.attach(trainer)
    sent: list[list[int]] = []

    def steps_in_mlflow(_: object) -> None:  # runs before this iteration's own save
        history = MlflowClient(uri).get_metric_history(tracker.cur_run.info.run_id, "train_loss")
        sent.append(sorted(metric.step for metric in history))

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), steps_in_mlflow)
    trainer.run()
    assert sent == [[1, 2]]


def test_an_empty_run_name_file_gets_a_fresh_name(tmp_path: Path) -> None:
    """A writer killed mid-write used to leave an empty ``mlflow_run_name.txt``, and the next training
    took "" for its run name (MLflow's handler then attaches to any unfinished run). Now the file is
    written atomically, and an empty one counts as absent."""
    from pipeline.tracking.store import RUN_NAME_FILE, training_run_name

    (tmp_path / RUN_NAME_FILE).write_text("")
    name = training_run_name(tmp_path, "unet3d-train")
    assert name.startswith("unet3d-train-")
    assert (tmp_path / RUN_NAME_FILE).read_text().strip() == name
    assert training_run_name(tmp_path, "unet3d-train") == name
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_NAME_FILE]  # no temporary left
