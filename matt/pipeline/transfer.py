"""The `transfer` recipe: student tokenizer -> prepared data -> init -> training -> save -> evaluation.

One Hydra job = one MLflow run (`matt.tracking`). Layout of the job's output directory:

    config.yaml            the resolved config
    tokenizer/             the student tokenizer
    init/                  initial embeddings (+ the key of what produced them)
    checkpoints/           trainer state (resume), mlflow_run.json (the run to reopen) and
                           finished.json (written when the whole job is done)
    train_log.jsonl        every logged training step
    embeddings/            learned embeddings (safetensors) + final training metrics
    model/                 the adapted HF model + tokenizer (`save_model=true`)
    eval/results.{json,md} every evaluation number; the table is also printed
    plots/loss.png         training curves

Distributed (`accelerate launch --num_processes N`): every process trains its shard of each batch
(DDP); the tokenizer, prepared data and initial embeddings are produced by the main process first
and loaded by the others; only the main process tracks, saves and evaluates.

Resuming: run the same command with `train.resume=true hydra.run.dir=<the job's directory>`; the
trainer continues from its checkpoint and MLflow logging continues in the same run. Resuming a job
that already finished (same `train.max_steps`) does nothing and says so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from matt.pipeline.config import enum_value
from matt.pipeline.run_context import JsonlLog, hydra_job, job_output_dir, method_label

logger = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"
"""In `checkpoints/`: written when the whole job (training, saving, evaluation) is done."""


def _finished_job(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir / FINISHED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
def run_transfer(cfg) -> float | None:
    """Run one transfer job; returns the trained student's bits per byte (None when not evaluated)."""
    from omegaconf import OmegaConf

    from matt.api import MATT
    from matt.digests import file_digest, texts_digest, tokenizer_fingerprint
    from matt.pipeline.evaluate import EvalSuite, eval_device, prefixed, results_table, write_results
    from matt.pipeline.init import INIT_DIR, init_key, init_metrics, initialize_student, release_memory
    from matt.pipeline.models import load_teacher_model, model_identity, text_config
    from matt.pipeline.preflight import check_init_checkpoint, preflight
    from matt.pipeline.save import adapted_model, save_adapted
    from matt.pipeline.probe import build_probe, write_probe_rows
    from matt.pipeline.tokenizer import build_student_tokenizer
    from matt.pipeline.train import build_adapters, make_accelerator, matt_config
    from matt.result import TransferResult
    from matt.tracking import flatten, open_tracker, save_run_reference
    from matt.trainer import CHECKPOINT_FILE

    started = time.perf_counter()
    output_dir = job_output_dir(cfg)
    plan = preflight(cfg)
    if cfg.dry_run:
        print(f"Config OK (dry run): {json.dumps(plan.summary(), default=str)}", flush=True)
        return None

    checkpoint_dir = output_dir / "checkpoints"
    finished = _finished_job(checkpoint_dir) if cfg.train.resume else None
    if finished is not None and finished.get("max_steps") == cfg.train.max_steps:
        message = (f"{output_dir} already finished ({finished['max_steps']} steps, final bpb {finished.get('bpb')}): "
                   "resuming it does nothing (raise train.max_steps to train further)")
        logger.warning(message)
        print(message, flush=True)
        return finished.get("bpb")
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    if cfg.train.resume and not (checkpoint_dir / CHECKPOINT_FILE).exists():
        logger.warning("train.resume=true but %s holds no checkpoint: starting from step 0. To continue a crashed "
                       "job, rerun it in its own directory: hydra.run.dir=<that job's directory>", checkpoint_dir)
    mcfg = matt_config(cfg, checkpoint_dir=checkpoint_dir)
    tied = bool(getattr(text_config(plan.model_config), "tie_word_embeddings",
                        getattr(plan.model_config, "tie_word_embeddings", False)))
    label = method_label(cfg, plan.n_layers, plan.with_ntp, tied)
    job = hydra_job(cfg)
    tags = {
        "matt.kind": "transfer", "matt.experiment": cfg.name, "matt.label": label, "matt.model": cfg.model.name,
        "matt.model_family": cfg.model.family, "matt.aim_impl": str(cfg.objective.aim_impl),
        "matt.objective": cfg.objective.name, "matt.loss": str(cfg.objective.loss),
        "matt.n_layers": plan.n_layers, "matt.with_ntp": str(plan.with_ntp).lower(),
        "matt.init": enum_value(cfg.init.method), "matt.tokenizer": enum_value(cfg.tokenizer.source),
        "matt.world_size": accelerator.num_processes, "matt.output_dir": str(output_dir.resolve()),
        **{f"matt.{k}": v for k, v in job.items()},
    }
    run_name = cfg.tracking.run_name or job.get("overrides") or cfg.name
    tracker = open_tracker(cfg.tracking, output_root=cfg.paths.output_root, is_main_process=is_main,
                           run_name=run_name, tags=tags, resume_from=checkpoint_dir if cfg.train.resume else None)
    if is_main:
        save_run_reference(tracker, checkpoint_dir)

    with tracker.run():
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        if is_main:
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            tracker.log_params({**flatten(resolved), "resolved.n_layers": plan.n_layers,
                                "resolved.with_ntp": plan.with_ntp, "resolved.depth": plan.depth,
                                "resolved.num_processes": accelerator.num_processes})
            tracker.log_artifact(output_dir / "config.yaml", "config")
            if tracker.resumed:
                tracker.set_tags({"matt.resumed": "true"})
        teacher_tokenizer, documents = plan.teacher_tokenizer, plan.documents
        cache_dir = Path(cfg.paths.cache_dir)

        # 1. student tokenizer (main process first; the others then hit the cache)
        with accelerator.main_process_first():
            student_tokenizer = plan.student_tokenizer or build_student_tokenizer(
                cfg.tokenizer, teacher_tokenizer, documents, cache_dir=cache_dir)
        check_init_checkpoint(cfg.init, plan.hidden_size, student_tokenizer)
        if is_main:
            student_tokenizer.save_pretrained(str(output_dir / "tokenizer"))
            if cfg.tracking.log_tokenizer:
                tracker.log_artifacts(output_dir / "tokenizer", "tokenizer")
        tracker.log_metrics({"data/teacher_vocab": len(teacher_tokenizer), "data/student_vocab": len(student_tokenizer),
                             **{f"data/{k}_documents": v for k, v in documents.summary().items()}})

        # 2. prepared (segmented) training data, cached on disk
        matt = MATT(config=mcfg, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer)
        with accelerator.main_process_first():
            matt.prepare_dataset(documents.train, text_column="text")
        tracker.log_metrics({f"data/{k}": v for k, v in _numeric(matt.segmentation_stats.as_dict()).items()})

        # 3. initial student embeddings (the token overlap is computed once: init, frozen rows, eval bytes)
        overlap = matt.overlap
        teacher_model = load_teacher_model(cfg.model, teacher_tokenizer)
        train_texts = [t for t in documents.train["text"] if t]
        key = init_key(cfg.init, model_identity(cfg.model), student_tokenizer, texts_digest(train_texts))
        with accelerator.main_process_first():
            student_model, init_info = initialize_student(
                cfg.init, teacher_model, teacher_tokenizer, student_tokenizer, train_texts,
                cache_dir=cache_dir, output_dir=output_dir, key=key, overlap=overlap)
        tracker.log_metrics(init_metrics(init_info))

        # 4. training (all processes); the peak-memory metric must describe this run only
        if accelerator.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(accelerator.device)
        train_log = JsonlLog(output_dir / "train_log.jsonl")
        teacher, student = build_adapters(cfg, matt, teacher_model, student_model, plan.n_layers)
        log_fns, probe, eval_model = [tracker.training_logger(), train_log], None, None
        if cfg.probe.enabled and is_main:  # held-out diagnostics, outside the training clock
            if cfg.probe.bpb:
                eval_model = adapted_model(load_teacher_model(cfg.model, teacher_tokenizer), TransferResult.load(
                    output_dir / INIT_DIR / "embeddings.safetensors"), student_tokenizer).to(eval_device(cfg.eval))
            probe = build_probe(cfg, documents=documents, teacher=teacher, student=student, overlap=overlap,
                                teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer,
                                eval_model=eval_model, log_fn=tracker.log_metrics, device=accelerator.device)
            log_fns.append(probe)
            if not (mcfg.resume and (checkpoint_dir / CHECKPOINT_FILE).exists()):
                probe.start()
        result = matt.train(teacher, student, log_fns=log_fns, accelerator=accelerator)
        if probe is not None:
            probe.finish(int(result.metrics["steps"]), float(result.metrics["wall_clock_s"]))
            write_probe_rows(probe.rows, output_dir / "probe.jsonl")
            tracker.log_artifact(output_dir / "probe.jsonl", "probe")
        del teacher_model, student_model, matt, teacher, student, probe, eval_model
        release_memory()
        if not is_main:
            return None
        result.save(output_dir / "embeddings")
        if cfg.tracking.log_embeddings:
            tracker.log_artifacts(output_dir / "embeddings", "embeddings")
        tracker.log_metrics({f"train/final_{k}": v for k, v in _numeric(result.metrics).items()},
                            step=cfg.train.max_steps)

        # 5. the adapted full model
        final_model = adapted_model(load_teacher_model(cfg.model, teacher_tokenizer), result, student_tokenizer)
        if cfg.save_model:
            save_adapted(final_model, student_tokenizer, output_dir / "model")
            if cfg.tracking.log_model:
                tracker.log_artifacts(output_dir / "model", "model")

        # 6. evaluation of original / init / final on one suite
        results: dict[str, dict[str, float]] = {}
        if cfg.eval.enabled:
            suite = EvalSuite.build(cfg.eval, documents, teacher_tokenizer=teacher_tokenizer,
                                    student_tokenizer=student_tokenizer, overlap=overlap)
            tracker.log_metrics(suite.describe())
            identity = model_identity(cfg.model)
            if cfg.eval.final:
                results["final"] = suite.run(final_model, student_tokenizer, name="final")
            del final_model
            release_memory()
            if cfg.eval.original:
                model = load_teacher_model(cfg.model, teacher_tokenizer)
                results["original"] = suite.run(
                    model, teacher_tokenizer, name="original", cache_dir=cache_dir,
                    cache_key={"model": identity, "tokenizer": tokenizer_fingerprint(teacher_tokenizer)})
                del model
                release_memory()
            if cfg.eval.init:
                init_file = output_dir / INIT_DIR / "embeddings.safetensors"
                model = adapted_model(load_teacher_model(cfg.model, teacher_tokenizer),
                                      TransferResult.load(init_file), student_tokenizer)
                results["init"] = suite.run(
                    model, student_tokenizer, name="init", cache_dir=cache_dir,
                    cache_key={"model": identity, "embeddings": file_digest(init_file),
                               "tokenizer": tokenizer_fingerprint(student_tokenizer)})
                del model
                release_memory()
            results = {name: results[name] for name in ("original", "init", "final") if name in results}
            tracker.log_metrics(prefixed(results))
            json_path, table_path = write_results(results, output_dir / "eval",
                                                  {"label": label, "skipped": suite.skipped, **suite.describe()})
            tracker.log_artifact(json_path, "eval")
            tracker.log_artifact(table_path, "eval")
            print(f"\n{cfg.name} · {label}\n{results_table(results)}\n", flush=True)
        else:
            del final_model

        # 7. plots
        from matt.report import plot_training_curves

        rows = train_log.read()
        if rows:
            plot = plot_training_curves({label: rows}, output_dir / "plots" / "loss.png")
            tracker.log_artifact(plot, "plots")
        tracker.log_metrics({"job/wall_clock_s": time.perf_counter() - started})
        logger.info("Transfer done: %s", output_dir)
    bpb = results.get("final", {}).get("bpb")
    (checkpoint_dir / FINISHED_FILE).write_text(json.dumps({"max_steps": cfg.train.max_steps, "bpb": bpb,
                                                            "run_id": tracker.run_id}))
    return bpb
