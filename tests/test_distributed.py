"""`accelerate launch` with 2 CPU processes (DDP over gloo) runs the transfer recipe data-parallel:
both ranks share one output directory, each trains on its shard of the batches, and only rank 0
writes the MLflow run, the checkpoints and the outputs."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_accelerate_launch(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "TQDM_DISABLE": "1"}
    env.pop("MATT_RUN_STAMP", None)
    steps = 4
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "experiments" / "transfer.py"), "experiment=smoke", "eval=bpb_only", "data.max_documents=3",
               f"train.max_steps={steps}", "train.log_every_n_steps=1", f"paths.output_root={tmp_path}",
               f"paths.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    run_dirs = list((tmp_path / "runs" / "smoke").iterdir())
    assert len(run_dirs) == 1, f"the ranks must share one run directory, got {run_dirs}"
    run_dir = run_dirs[0]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "eval" / "results.json").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1, "only rank 0 may create an MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["matt.world_size"] == "2" and run.data.params["resolved.num_processes"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, steps + 1))  # logged once per step: by rank 0 only

    # Data parallelism: each rank sees every other batch, so an epoch takes half the steps.
    examples = int(run.data.metrics["data/examples"])
    batches = math.ceil(examples / 4)
    per_rank = math.ceil(batches / 2)
    history = sorted(client.get_metric_history(run.info.run_id, "train/epoch"), key=lambda m: m.step)
    epochs = [int(m.value) for m in history]
    assert epochs == [(s - 1) // per_rank for s in range(1, steps + 1)]
    assert epochs != [(s - 1) // batches for s in range(1, steps + 1)], "pick data so one process would differ"
