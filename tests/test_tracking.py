"""`matt.tracking` against the embedded sqlite store: run lifecycle, crash status, resume into the
same run, immutable params on resume, rank-0-only logging."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from matt.pipeline.config import TrackingConfig
from matt.tracking import (
    MLflowTracker, Tracker, default_tracking_uri, flatten, load_run_reference, metric_name, numeric_metrics,
    open_tracker, save_run_reference,
)


def tracking_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(TrackingConfig(experiment_name="unit")), overrides)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module (creating the sqlite schema takes seconds)."""
    return tmp_path_factory.mktemp("store")


def test_flatten_and_metric_names():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "x"}) == {
        "a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "f": "x"}
    assert metric_name("lm_eval/belebele/acc,none") == "lm_eval/belebele/acc_none"
    assert numeric_metrics({"n": 3, "x": 0.5, "ok": True, "name": "a", "none": None}, "p/") == {"p/n": 3.0, "p/x": 0.5}
    assert metric_name("final/bpb") == "final/bpb"


def test_run_lifecycle_params_metrics_artifacts(tmp_path, store):
    tracker = open_tracker(tracking_cfg(experiment_name="lifecycle"), output_root=store, run_name="r",
                           tags={"matt.kind": "unit"})
    assert isinstance(tracker, MLflowTracker)
    assert tracker.tracking_uri == default_tracking_uri(store) and (store / "mlflow.db").exists()
    (tmp_path / "f.txt").write_text("hello")
    with tracker.run():
        tracker.log_params({"train.lr": 0.001, "model.name": "tiny"})
        log = tracker.training_logger()
        for step in (1, 2, 3):
            log({"loss": 1.0 / step}, step)
        tracker.log_artifact(tmp_path / "f.txt", "files")
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "model.name": "tiny"}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.data.tags["matt.kind"] == "unit" and run.data.tags["matt.host"]
    assert run.data.tags["matt.git_commit"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "files")] == ["files/f.txt"]
    # artifacts of the embedded store live next to the database, not in the working directory
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_crash_ends_the_run_with_the_exception(store, error, status):
    tracker = open_tracker(tracking_cfg(experiment_name="crash"), output_root=store)
    with pytest.raises(type(error)):
        with tracker.run():
            raise error
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["matt.error"].startswith(type(error).__name__)
    assert "error/traceback.txt" in [a.path for a in client.list_artifacts(tracker.run_id, "error")]


def test_resume_reopens_the_same_run_and_keeps_first_params(tmp_path, store):
    checkpoints = tmp_path / "run" / "checkpoints"
    cfg = tracking_cfg(experiment_name="resume")
    first = open_tracker(cfg, output_root=store)
    save_run_reference(first, checkpoints)
    with pytest.raises(RuntimeError):
        with first.run():
            first.log_params({"train.resume": "false", "train.lr": "0.1"})
            first.log_metrics({"train/loss": 2.0}, step=1)
            raise RuntimeError("crash")
    assert load_run_reference(checkpoints)["run_id"] == first.run_id

    second = open_tracker(cfg, output_root=store, resume_from=checkpoints)
    assert second.run_id == first.run_id and second.resumed
    with second.run():
        second.log_params({"train.resume": "true", "train.lr": "0.1", "new.key": "1"})
        second.log_metrics({"train/loss": 1.0}, step=2)
    client = MlflowClient(second.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.resume": "false", "train.lr": "0.1", "new.key": "1"}
    assert run.data.tags["matt.resume_changed_params"] == "train.resume"
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_refuses_a_different_store(tmp_path, store):
    first = open_tracker(tracking_cfg(), output_root=store)
    save_run_reference(first, tmp_path / "ckpt")
    first.finish()
    with pytest.raises(ValueError, match="same tracking settings"):
        open_tracker(tracking_cfg(), output_root=tmp_path / "b", resume_from=tmp_path / "ckpt")


def test_only_the_main_process_and_enabled_backends_track(tmp_path):
    worker = open_tracker(tracking_cfg(), output_root=tmp_path / "w", is_main_process=False)
    off = open_tracker(tracking_cfg(backend="none"), output_root=tmp_path / "n")
    for tracker in (worker, off):
        assert type(tracker) is Tracker and tracker.run_id is None
        with tracker.run():
            tracker.log_metrics({"x": 1.0}, step=1)
            tracker.log_params({"a": 1})
        assert save_run_reference(tracker, tmp_path / "ckpt") is None
    assert not (tmp_path / "w").exists() and not (tmp_path / "n").exists()


def test_long_params_are_cut_to_mlflows_limit(store):
    tracker = open_tracker(tracking_cfg(), output_root=store)
    tracker.log_params({"long": "x" * 7000})
    tracker.finish()
    assert len(MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).data.params["long"]) == 6000
