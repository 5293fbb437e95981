"""The transfer recipe end to end on tiny models, in-process through the Hydra entry point:
outputs and MLflow contents of one run, `evaluate` on the saved model, a 2-job multirun + report,
crash -> FAILED run -> resume into the same run, and a run against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hydra_helpers import recipe, run_app

evaluate = recipe("evaluate").main
report = recipe("report").main
transfer = recipe("transfer").main

FAST = ["experiment=smoke", "eval=quick"]


def uri(root: Path) -> str:
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def runs_of(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(client, run_id, path=None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYDRA_FULL_ERROR", "1")  # exceptions propagate instead of sys.exit(1)
        yield patch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Shared tokenizer / dataset / fastText / evaluation caches (as across a user's runs)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, env, cache):
    root = tmp_path_factory.mktemp("smoke")
    run_app(transfer, FAST + [f"paths.output_root={root}", f"paths.cache_dir={cache}", f"hydra.run.dir={root / 'run'}"])
    return root


def test_a_run_writes_a_loadable_model_and_every_output(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matt.result import TransferResult

    run_dir = smoke_run / "run"
    for name in ("config.yaml", "tokenizer/tokenizer.json", "init/embeddings.safetensors",
                 "checkpoints/trainer_state.pt", "checkpoints/mlflow_run.json", "train_log.jsonl",
                 "embeddings/embeddings.safetensors", "model/config.json", "eval/results.json", "eval/results.md",
                 "plots/loss.png"):
        assert (run_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    learned = TransferResult.load(run_dir / "embeddings")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == learned.vocab_size
    assert torch.equal(model.get_input_embeddings().weight.detach(), learned.input_embeddings)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    ids = tokenizer("Привіт, світе!", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()
    results = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
    assert list(results) == ["original", "init", "final"]
    assert results["init"]["bytes_per_token"] == results["final"]["bytes_per_token"]  # same student tokenizer
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_the_run_lands_in_mlflow_with_params_metrics_artifacts_tags(smoke_run):
    client, runs = runs_of(uri(smoke_run), "smoke")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["objective.name"] == "aim" and params["objective.n_layers"] == "null"  # flattened resolved config
    assert params["resolved.n_layers"] == "2"  # objective.n_layers None: a third of the 6 layers, resolved by preflight
    assert params["model.family"] == "llama" and params["train.max_steps"] == "12" and params["resolved.depth"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
    for prefix in ("original", "init", "final"):
        for metric in ("bpb", "bytes_per_token", "unigram_bpb", "choice_accuracy", "chrf"):
            assert f"{prefix}/{metric}" in run.data.metrics, f"{prefix}/{metric}"
    results = json.loads((smoke_run / "run" / "eval" / "results.json").read_text())["models"]
    assert run.data.metrics["final/bpb"] == pytest.approx(results["final"]["bpb"])
    assert run.data.metrics["initialization/num_new"] > 0 and run.data.metrics["data/examples"] > 0
    tags = run.data.tags
    assert tags["matt.model_family"] == "llama" and tags["matt.aim_impl"] == "aim" and tags["matt.host"]
    assert len(tags["mlflow.source.git.commit"]) == 40 or tags["mlflow.source.git.commit"] == "unknown"
    assert {"config/config.yaml", "embeddings/embeddings.safetensors", "tokenizer/tokenizer.json",
            "eval/results.json", "plots/loss.png"} <= artifact_paths(client, run.info.run_id)


def test_evaluate_on_the_saved_model_reproduces_the_final_numbers(smoke_run, env, tmp_path):
    run_app(evaluate, ["data=tiny_sample", "eval=quick", f"model_dir={smoke_run / 'run' / 'model'}", "prefix=saved",
              f"paths.output_root={smoke_run}", f"hydra.run.dir={tmp_path / 'eval'}"])
    _, transfer_runs = runs_of(uri(smoke_run), "smoke")
    _, eval_runs = runs_of(uri(smoke_run), "evaluate")
    final, saved = transfer_runs[0].data.metrics, eval_runs[-1].data.metrics
    for metric in ("bpb", "bytes_per_token", "unigram_bpb", "choice_accuracy", "chrf"):
        assert saved[f"saved/{metric}"] == pytest.approx(final[f"final/{metric}"], rel=1e-5), metric
    assert eval_runs[-1].data.tags["matt.kind"] == "evaluate"


def test_evaluate_a_transfer_job_directory_reproduces_its_numbers(smoke_run, env, tmp_path):
    """run_dir=<job>: the original, init and final models rebuilt from the job's saved embeddings (no
    saved model needed) give the job's own numbers; bf16 evaluation stays close to them."""
    job = smoke_run / "run"
    args = ["data=tiny_sample", "eval=quick", f"run_dir={job}", "eval.init=true", "eval.final=true",
            f"paths.output_root={smoke_run}"]
    run_app(evaluate, [*args, f"hydra.run.dir={tmp_path / 'eval'}"])
    original = json.loads((job / "eval" / "results.json").read_text())["models"]
    again = json.loads((tmp_path / "eval" / "eval" / "results.json").read_text())["models"]
    assert set(again) == {"original", "init", "final"}
    for model in again:
        for metric in ("bpb", "bpb_new", "choice_accuracy", "chrf"):
            assert again[model][metric] == pytest.approx(original[model][metric], rel=1e-5), (model, metric)
        assert len(again[model]["bpb_document_bits"]) == len(again[model]["bpb_document_bytes"]) > 0
        assert again[model]["bpb_ci_low"] <= again[model]["bpb"] <= again[model]["bpb_ci_high"]
    run_app(evaluate, [*args, "eval.precision=bf16", "eval.original=false", "eval.init=false",
                       f"hydra.run.dir={tmp_path / 'bf16'}"])
    bf16 = json.loads((tmp_path / "bf16" / "eval" / "results.json").read_text())["models"]
    assert set(bf16) == {"final"}
    assert bf16["final"]["bpb"] == pytest.approx(original["final"]["bpb"], rel=2e-2)
    assert bf16["final"]["bpb"] != original["final"]["bpb"]  # autocast really ran in bf16
    with pytest.raises(ValueError, match="exactly one of model_dir"):
        run_app(evaluate, ["data=tiny_sample", "eval=quick", f"hydra.run.dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="not a transfer job"):
        run_app(evaluate, ["data=tiny_sample", "eval=quick", f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'x'}"])


def test_a_run_computes_the_token_overlap_once(tmp_path, env, monkeypatch):
    """Student init, the frozen-row mask and the evaluation's new/shared bytes share one overlap."""
    import sys

    import matt.overlap
    import matt.pipeline.evaluate
    import matt.pipeline.init  # noqa: F401 - load the modules that bind token_overlap before patching

    original, calls = matt.overlap.token_overlap, []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):  # every module that bound the function by name
        if getattr(module, "__name__", "").startswith("matt") and getattr(module, "token_overlap", None) is original:
            monkeypatch.setattr(module, "token_overlap", counting)
    run_app(transfer, FAST + ["train.max_steps=2", "save_model=false", f"paths.output_root={tmp_path}",
                              f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert "bpb_new" in json.dumps(results)  # the evaluation did split bytes into new / shared
    assert len(calls) == 1


def test_multirun_gives_one_mlflow_run_per_job_and_a_report(tmp_path, env, cache):
    root = tmp_path / "sweep"
    run_app(transfer, ["-m", "experiment=smoke", "eval=bpb_only", "objective=aim,aim_star", "train.max_steps=4",
              f"paths.output_root={root}", f"paths.cache_dir={cache}", f"hydra.sweep.dir={root / 'sweep'}"])
    client, runs = runs_of(uri(root), "smoke")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["matt.aim_impl"] for r in runs) == ["aim", "aim_star"]
    assert len({r.data.tags["matt.sweep_id"] for r in runs}) == 1  # tagged by their sweep
    assert sorted(r.info.run_name for r in runs) == ["eval=bpb_only,objective=aim,train.max_steps=4",
                                                     "eval=bpb_only,objective=aim_star,train.max_steps=4"]
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
        assert "final/bpb" in run.data.metrics
        assert "embeddings/embeddings.safetensors" in artifact_paths(client, run.info.run_id, "embeddings")
    assert (root / "sweep" / "0" / "model" / "config.json").is_file() and (root / "sweep" / "1").is_dir()

    run_app(report, ["experiment_name=smoke", f"paths.output_root={root}", f"hydra.run.dir={root / 'report'}"])
    directory = root / "reports" / "smoke"
    table = (directory / "table.md").read_text()
    assert "aim mse L2" in table and "aim_star mse L2" in table and "original (tiny_llama)" in table
    assert "bpb % of original" in table and "focus init" in table
    header = (directory / "table.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "model", "n_layers", "bpb"] and "train time (s)" in header
    for plot in ("loss_curves.png", "layer_depth.png", "methods.png"):
        assert (directory / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_a_crashed_run_is_failed_and_resumes_into_the_same_run(tmp_path, env, cache, monkeypatch):
    from matt.pipeline import run_context
    from matt.result import TransferResult

    root = tmp_path / "crash"
    args = ["experiment=smoke", "eval=none", "train.max_steps=6", "train.save_every_n_steps=100",
            f"paths.output_root={root}", f"paths.cache_dir={cache}", f"hydra.run.dir={root / 'run'}"]
    original_log = run_context.JsonlLog.__call__

    def crash_at_step_4(self, metrics, step):
        original_log(self, metrics, step)
        if step == 4:
            raise RuntimeError("simulated crash at step 4")

    monkeypatch.setattr(run_context.JsonlLog, "__call__", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_app(transfer, args)
    client, runs = runs_of(uri(root), "smoke")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "simulated crash at step 4" in runs[0].data.tags["matt.error"]
    assert "error/traceback.txt" in artifact_paths(client, runs[0].info.run_id)
    state = json.loads((root / "run" / "checkpoints" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the finished steps were checkpointed on the way out

    monkeypatch.setattr(run_context.JsonlLog, "__call__", original_log)
    run_app(transfer, args + ["train.resume=true"])
    client, runs = runs_of(uri(root), "smoke")
    assert len(runs) == 1, "resuming must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["matt.resumed"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]
    assert "embeddings/embeddings.safetensors" in artifact_paths(client, run.info.run_id, "embeddings")

    # ... and ends where an uninterrupted run of the same config ends
    run_app(transfer, [a for a in args if not a.startswith("hydra.run.dir")] + [f"hydra.run.dir={root / 'straight'}"])
    resumed = TransferResult.load(root / "run" / "embeddings")
    straight = TransferResult.load(root / "straight" / "embeddings")
    assert torch.allclose(resumed.input_embeddings, straight.input_embeddings, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# a real MLflow tracking server
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port> with its own sqlite store and artifact root."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--workers", "1"]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_a_run_against_a_real_mlflow_server(mlflow_server, tmp_path, env, cache):
    root = tmp_path / "served"
    run_app(transfer, ["experiment=smoke", "eval=bpb_only", "train.max_steps=4", "tracking=mlflow_server",
              f"tracking.uri={mlflow_server}", f"paths.output_root={root}", f"paths.cache_dir={cache}",
              f"hydra.run.dir={root / 'run'}"])
    assert not (root / "mlflow.db").exists()  # nothing went to the embedded store
    client, runs = runs_of(mlflow_server, "smoke")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert len(client.get_metric_history(run_id, "train/loss")) == 2 and "final/bpb" in runs[0].data.metrics
    assert {"embeddings/embeddings.safetensors", "config/config.yaml"} <= artifact_paths(client, run_id)
    # artifacts went through the server into its artifact store
    local = Path(client.download_artifacts(run_id, "embeddings/embeddings.safetensors", str(tmp_path)))
    assert local.read_bytes() == (root / "run" / "embeddings" / "embeddings.safetensors").read_bytes()


@pytest.mark.parametrize("overrides,untied", [
    (["model=tiny_gemma3", "tokenizer=extend", "tokenizer.num_new_tokens=100", "init=mean"], False),
    (["model=tiny_qwen3", "objective=aim_star", "init=random"], True),  # untied: NTP on by default
    (["model=tiny_gpt_neox", "objective=ntp"], True),
], ids=["gemma3-extend-mean", "qwen3-aim_star-random", "gpt_neox-ntp"])
def test_other_families_tokenizers_inits_and_objectives(overrides, untied, tmp_path, env, cache):
    from matt.result import TransferResult

    root = tmp_path / "run"
    run_app(transfer, ["experiment=smoke", "eval=none", "train.max_steps=2", "save_model=false",
                       f"paths.output_root={tmp_path}", f"paths.cache_dir={cache}", f"hydra.run.dir={root}",
                       *overrides])
    _, runs = runs_of(uri(tmp_path), "smoke")
    assert [r.info.status for r in runs] == ["FINISHED"]
    init, learned = TransferResult.load(root / "init"), TransferResult.load(root / "embeddings")
    assert learned.input_embeddings.shape == init.input_embeddings.shape
    assert not torch.equal(learned.input_embeddings, init.input_embeddings)
    assert learned.tie_word_embeddings is not untied
    if untied:  # the NTP term trained the LM head's new rows too
        assert not torch.equal(learned.output_embeddings, init.output_embeddings)
