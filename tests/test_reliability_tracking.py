"""Tracking under faults (issue 12): a fresh sqlite store used by parallel jobs, a store that fails
while a run is failing, resumed runs re-logging steps, an explicit sqlite store's artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from matt.pipeline.config import TrackingConfig
from matt.tracking import open_tracker, save_run_reference

REPO = Path(__file__).resolve().parents[1]


def tracking_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(TrackingConfig(experiment_name="reliability")), overrides)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


JOB = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from omegaconf import OmegaConf
    from matt.pipeline.config import TrackingConfig
    from matt.tracking import open_tracker

    root, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = OmegaConf.structured(TrackingConfig(experiment_name="parallel"))
    (root.parent / f"ready-{name}").touch()
    while not go.exists():  # start together: both find the store fresh
        time.sleep(0.005)
    tracker = open_tracker(cfg, output_root=root, run_name=name)
    with tracker.run():
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    print(tracker.run_id)
""")


def test_two_jobs_on_a_fresh_sqlite_store_both_finish(tmp_path):
    """Both jobs migrate a brand-new store at the same moment (what `hydra/launcher=local_parallel`
    does on its first sweep); without the store lock one of them crashed in alembic."""
    root, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    jobs = [subprocess.Popen([sys.executable, "-c", JOB, str(root), str(go), name], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    import time

    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [job.communicate(timeout=180) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_store_failure_while_failing_does_not_hide_the_cause(store, monkeypatch):
    tracker = open_tracker(tracking_cfg(), output_root=store)

    def store_down(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) UPDATE runs SET status=FAILED: disk I/O error")

    for method in ("log_batch", "log_text", "set_terminated"):
        monkeypatch.setattr(tracker.client, method, store_down)
    with pytest.raises(RuntimeError, match="the real cause"):
        with tracker.run():
            raise RuntimeError("the real cause")


def test_resumed_run_has_no_duplicate_points(tmp_path, store):
    """Steps 4-5 ran before a kill -9 (checkpoint at 3) and again after the resume: logged once."""
    checkpoints = tmp_path / "checkpoints"
    first = open_tracker(tracking_cfg(experiment_name="dupes"), output_root=store)
    save_run_reference(first, checkpoints)
    log = first.training_logger()
    for step in range(1, 6):
        log({"loss": float(step), "lr": 0.1}, step)
    first.log_metrics({"data/examples": 10.0})

    second = open_tracker(tracking_cfg(experiment_name="dupes"), output_root=store, resume_from=checkpoints)
    assert second.run_id == first.run_id
    with second.run():
        second.log_metrics({"data/examples": 10.0})
        log = second.training_logger()
        for step in range(4, 8):
            log({"loss": float(step), "lr": 0.1}, step)
    client = MlflowClient(second.tracking_uri)
    for name in ("train/loss", "train/lr"):
        assert sorted(m.step for m in client.get_metric_history(first.run_id, name)) == list(range(1, 8))
    assert len(client.get_metric_history(first.run_id, "data/examples")) == 1


def test_explicit_sqlite_store_keeps_artifacts_next_to_it(tmp_path, monkeypatch):
    cwd, database = tmp_path / "cwd", tmp_path / "elsewhere" / "tracking.db"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "f.txt").write_text("x")
    tracker = open_tracker(tracking_cfg(uri=f"sqlite:///{database}"), output_root=tmp_path / "out")
    with tracker.run():
        tracker.log_artifact(tmp_path / "f.txt", "files")
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((database.parent / "mlartifacts").as_uri())
    assert (database.parent / "mlartifacts").is_dir() and not (cwd / "mlruns").exists()
