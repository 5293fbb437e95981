"""Jobs through the Hydra entry point under faults (issue 12): unique run directories for jobs started
in the same second, cost accumulated across a resume, a finished job resumed as a no-op."""

from __future__ import annotations

import datetime
import json
import time
import types

import pytest
from mlflow import MlflowClient

from hydra_helpers import recipe, run_app
from matt import hydra_app
from matt.pipeline import run_context

transfer = recipe("transfer").main


def test_jobs_started_in_the_same_second_get_separate_directories(monkeypatch):
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5)
    fake = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: frozen))
    monkeypatch.setattr(run_context, "_dt", fake)
    monkeypatch.delenv(run_context.STAMP_ENV, raising=False)
    first, second = run_context.run_stamp(), run_context.run_stamp()
    assert first != second and first.startswith("2026-01-02_03-04-05_") and second.startswith("2026-01-02_03-04-05_")
    # one launch (all ranks of `accelerate launch`) shares the stamp rank 0 put in the environment
    monkeypatch.setenv(run_context.STAMP_ENV, first)
    assert run_context.run_stamp() == first


def test_run_dirs_of_two_composed_jobs_differ():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    directory = hydra_app.setup()
    run_dirs = []
    for _ in range(2):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name="transfer", overrides=["experiment=smoke"], return_hydra_config=True)
        OmegaConf.resolve(cfg)
        run_dirs.append(cfg.hydra.run.dir)
    GlobalHydra.instance().clear()
    assert run_dirs[0] != run_dirs[1] and all("/runs/smoke/" in d for d in run_dirs)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    return monkeypatch


def test_resume_accumulates_cost_and_a_finished_job_resumes_as_a_no_op(tmp_path, env, capsys):
    from matt.pipeline import run_context

    root = tmp_path / "out"
    args = ["experiment=smoke", "eval=none", "train.max_steps=6", "train.log_every_n_steps=1",
            "train.save_every_n_steps=100", f"paths.output_root={root}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={root / 'run'}"]
    import matt.trainer as trainer_module

    original_log, original_aim_loss = run_context.JsonlLog.__call__, trainer_module.aim_loss
    calls = []

    def slow_second_step(*args, **kwargs):  # inside a training step: counted (log-function time is not)
        calls.append(1)
        if len(calls) == 2:
            time.sleep(1.0)
        return original_aim_loss(*args, **kwargs)

    def crash(self, metrics, step):
        original_log(self, metrics, step)
        if step == 3:
            raise RuntimeError("simulated crash at step 3")

    env.setattr(trainer_module, "aim_loss", slow_second_step)
    env.setattr(run_context.JsonlLog, "__call__", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_app(transfer, args)
    env.setattr(run_context.JsonlLog, "__call__", original_log)
    env.setattr(trainer_module, "aim_loss", original_aim_loss)
    run_app(transfer, args + ["train.resume=true"])

    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    metrics = run.data.metrics
    # the crashed attempt's second and steps 1-3 count: flops of 6 steps, time including the sleep
    flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/flops")}
    assert sorted(flops) == [1, 2, 3, 4, 5, 6]
    assert metrics["train/final_flops"] == flops[6] and flops[6] > flops[3] > flops[1] > 0
    assert metrics["train/final_wall_clock_s"] >= 1.0
    saved = (root / "run" / "embeddings" / "metrics.json").read_bytes()
    assert json.loads(saved)["wall_clock_s"] >= 1.0
    points = {name: len(client.get_metric_history(run.info.run_id, name)) for name in metrics}
    capsys.readouterr()

    run_app(transfer, args + ["train.resume=true"])
    assert "already finished (6 steps" in capsys.readouterr().out
    assert (root / "run" / "embeddings" / "metrics.json").read_bytes() == saved
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    assert {name: len(client.get_metric_history(run.info.run_id, name)) for name in metrics} == points


def test_two_concurrent_jobs_on_a_fresh_store_both_finish_in_separate_directories(tmp_path):
    """Two `experiments/transfer.py` started together (as a parallel sweep does) on a fresh output root."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "TQDM_DISABLE": "1"}
    env.pop(run_context.STAMP_ENV, None)
    command = [sys.executable, str(repo / "experiments" / "transfer.py"), "experiment=smoke", "eval=none",
               "data.max_documents=4", "train.max_steps=2", f"paths.output_root={tmp_path / 'out'}",
               f"paths.cache_dir={tmp_path / 'cache'}"]
    jobs = [subprocess.Popen(command + [f"label=job{i}"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=400)
        assert job.returncode == 0, err[-4000:]
    run_dirs = sorted((tmp_path / "out" / "runs" / "smoke").iterdir())
    assert len(run_dirs) == 2
    run_ids = sorted(json.loads((d / "checkpoints" / "mlflow_run.json").read_text())["run_id"] for d in run_dirs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.info.run_id for r in runs) == run_ids and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["matt.label"] for r in runs) == ["job0", "job1"]
    for run in runs:  # each directory holds its own run's outputs
        assert run.data.tags["matt.output_dir"] in {str(d.resolve()) for d in run_dirs}
    assert len({r.data.tags["matt.output_dir"] for r in runs}) == 2


def test_sigterm_stops_a_job_killed_with_its_last_steps_checkpointed(tmp_path, env):
    """A scheduler's SIGTERM (preemption, `kill`) mid-training: the run ends KILLED in MLflow (not
    left RUNNING), the emergency checkpoint holds every finished step, and resume continues it."""
    import os
    import signal

    from matt.pipeline import run_context
    from matt.tracking import Terminated

    root = tmp_path / "out"
    args = ["experiment=smoke", "eval=none", "train.max_steps=6", "train.log_every_n_steps=1",
            "train.save_every_n_steps=100", f"paths.output_root={root}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={root / 'run'}"]
    original_log = run_context.JsonlLog.__call__

    def terminate_at_step_3(self, metrics, step):
        original_log(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    env.setattr(run_context.JsonlLog, "__call__", terminate_at_step_3)
    with pytest.raises(Terminated, match="SIGTERM"):
        run_app(transfer, args)
    assert signal.getsignal(signal.SIGTERM) is handler  # the job's handler is gone afterwards
    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "KILLED" and "Terminated" in run.data.tags["matt.error"]
    saved = json.loads((root / "run" / "checkpoints" / "trainer_state.json").read_text())
    assert saved["step"] == 3
    env.setattr(run_context.JsonlLog, "__call__", original_log)
    run_app(transfer, args + ["train.resume=true"])
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
