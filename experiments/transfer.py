"""Tokenizer transfer of one model, top to bottom: student tokenizer -> prepared data -> initial
embeddings -> adapters -> training -> adapted model -> evaluation, tracked in one MLflow run.

    python experiments/transfer.py experiment=smoke
    python experiments/transfer.py -m experiment=smoke objective=aim,aim_star objective.n_layers=2,4
    accelerate launch --multi_gpu --num_processes 2 experiments/transfer.py experiment=smoke

The job's output directory (Hydra's run directory):

    config.yaml            the resolved config
    tokenizer/             the student tokenizer
    init/                  initial embeddings (+ the key of what produced them)
    checkpoints/           trainer state (resume), mlflow_run.json (the run to reopen) and
                           finished.json (written when the whole job is done)
    train_log.jsonl        every logged training step (probe.jsonl: the `probe` group's rows)
    embeddings/            learned embeddings (safetensors) + final training metrics
    model/                 the adapted HF model + tokenizer (`save_model=true`)
    eval/results.{json,md} every evaluation number; the table is also printed
    plots/loss.png         training curves

Distributed: every process trains its shard of each batch (DDP); the tokenizer, prepared data and
initial embeddings are produced by the main process first and loaded by the others; only the main
process tracks, saves and evaluates. Resume: rerun with `train.resume=true hydra.run.dir=<the job's
directory>`; training continues from the checkpoint, logging in the same MLflow run, and a job that
already finished (same `train.max_steps`) does nothing. `experiment=recover_known` runs the
known-answer check instead (`matt/pipeline/recover.py`). See docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from matt.api import MATT
from matt.digests import file_digest, texts_digest, tokenizer_fingerprint
from matt.hydra_app import hydra_main, share_run_stamp_across_processes, sigterm_stops_the_job
from matt.modeling import adapter_for
from matt.pipeline.evaluate import EvalSuite, eval_device, prefixed, results_table, write_results
from matt.pipeline.init import INIT_DIR, adapted_model, init_key, init_metrics, initialize_student, release_memory
from matt.pipeline.models import load_teacher_model, model_identity
from matt.pipeline.preflight import check_init_checkpoint
from matt.pipeline.probe import build_probe, write_probe_rows
from matt.pipeline.recover import run_recover
from matt.pipeline.run_context import JsonlLog, log_job_config, method_label, open_job_tracker, start_job
from matt.pipeline.tokenizer import build_student_tokenizer
from matt.report import plot_training_curves
from matt.result import TransferResult
from matt.tracking import numeric_metrics
from matt.trainer import CHECKPOINT_FILE

logger = logging.getLogger("matt.transfer")

FINISHED_FILE = "finished.json"  # in checkpoints/: training, saving and evaluation are all done


@hydra_main("transfer")
def main(cfg) -> float | None:
    """One Hydra job; returns the trained student's bits per byte (None when not evaluated)."""
    with sigterm_stops_the_job():  # SIGTERM -> emergency checkpoint and MLflow run KILLED, as Ctrl-C
        return run_recover(cfg) if cfg.recover.enabled else transfer(cfg)


def transfer(cfg) -> float | None:
    started = time.perf_counter()

    # 0. validate everything before heavy work (teacher tokenizer + config, documents, n_layers); the
    #    processes and training settings
    job = start_job(cfg)
    if job is None:  # dry run
        return None
    output_dir, checkpoint_dir, plan, accelerator, mcfg = job
    finished_file = checkpoint_dir / FINISHED_FILE
    finished = json.loads(finished_file.read_text()) if cfg.train.resume and finished_file.is_file() else None
    if finished is not None and finished.get("max_steps") == cfg.train.max_steps:
        message = (f"{output_dir} already finished ({finished['max_steps']} steps, final bpb {finished.get('bpb')}): "
                   "resuming it does nothing (raise train.max_steps to train further)")
        logger.warning(message)
        print(message, flush=True)
        return finished.get("bpb")
    if cfg.train.resume and not (checkpoint_dir / CHECKPOINT_FILE).exists():
        logger.warning("train.resume=true but %s holds no checkpoint: starting from step 0. To continue a crashed "
                       "job, rerun it in its own directory: hydra.run.dir=<that job's directory>", checkpoint_dir)

    # 1. the MLflow run
    is_main = accelerator.is_main_process
    tied = bool(getattr(plan.model_config.get_text_config(), "tie_word_embeddings",
                        getattr(plan.model_config, "tie_word_embeddings", False)))
    label = method_label(cfg, plan.n_layers, plan.with_ntp, tied)
    tracker = open_job_tracker(cfg, job, kind="transfer", label=label, model_family=cfg.model.family,
                               tokenizer=str(cfg.tokenizer.source), world_size=accelerator.num_processes)
    with tracker.run():
        if is_main:
            log_job_config(tracker, cfg, output_dir, n_layers=plan.n_layers, with_ntp=plan.with_ntp,
                           depth=plan.depth, num_processes=accelerator.num_processes)
        teacher_tokenizer, documents, cache_dir = plan.teacher_tokenizer, plan.documents, cfg.paths.cache_dir

        # 2. student tokenizer: pretrained | trained on the train split | the teacher's extended (cached)
        with accelerator.main_process_first():  # the others then load it from the cache
            student_tokenizer = plan.student_tokenizer or build_student_tokenizer(
                cfg.tokenizer, teacher_tokenizer, documents, cache_dir=cache_dir)
        check_init_checkpoint(cfg.init, plan.hidden_size, student_tokenizer)
        if is_main:
            student_tokenizer.save_pretrained(str(output_dir / "tokenizer"))
            if cfg.tracking.log_tokenizer:
                tracker.log_artifacts(output_dir / "tokenizer", "tokenizer")
        tracker.log_metrics({"data/teacher_vocab": len(teacher_tokenizer), "data/student_vocab": len(student_tokenizer),
                             **{f"data/{k}_documents": v for k, v in documents.summary().items()}})

        # 3. training data: documents segmented into aligned teacher/student examples (cached on disk)
        matt = MATT(config=mcfg, teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer)
        with accelerator.main_process_first():
            matt.prepare_dataset(documents.train, text_column="text")
        tracker.log_metrics(numeric_metrics(matt.segmentation_stats.as_dict(), "data/"))

        # 4. the student: a copy of the teacher with initial embeddings for the new vocabulary. The token
        #    overlap is computed once (matt.overlap) for the init, the frozen rows and the eval's new bytes.
        overlap = matt.overlap
        teacher_model = load_teacher_model(cfg.model, teacher_tokenizer)
        train_texts = [t for t in documents.train["text"] if t]
        key = init_key(cfg.init, model_identity(cfg.model), student_tokenizer, texts_digest(train_texts))
        with accelerator.main_process_first():  # init/ written once, then loaded by the others (and on resume)
            student_model, init_info = initialize_student(
                cfg.init, teacher_model, teacher_tokenizer, student_tokenizer, train_texts,
                cache_dir=cache_dir, output_dir=output_dir, key=key, overlap=overlap)
        tracker.log_metrics(init_metrics(init_info))

        # 5. adapters: both models cut after the AIM layer; the teacher all frozen (kept in the model
        #    dtype), the student's rows shared with the teacher frozen when objective.freeze_shared
        adapter = adapter_for(teacher_model)
        all_rows = torch.ones(teacher_model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        teacher = adapter(teacher_model, n_layers=plan.n_layers, frozen_embeddings_mask=all_rows)
        frozen = matt.prepare_frozen_embeddings_mask() if cfg.objective.freeze_shared else None
        student = adapter(student_model, n_layers=plan.n_layers, frozen_embeddings_mask=frozen,
                          with_ntp=cfg.objective.with_ntp)
        if student.is_tied:  # the output side exists from here on (a probe measures it from step 0)
            student.set_output_mode(cfg.objective.output_embeddings)
        logger.info("Training %s (%s) at n_layers=%d of %d, %s; %d trainable embedding rows", label,
                    cfg.objective.aim_impl, plan.n_layers, student.original_num_layers,
                    f"output_embeddings={cfg.objective.output_embeddings}" if student.is_tied else "untied LM head",
                    sum(p.shape[0] for p in student.trainable_parameters()))

        # 6. training (all processes), with an optional held-out probe outside the training clock
        if accelerator.device.type == "cuda":  # the peak-memory metric must describe this run only
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        train_log = JsonlLog(output_dir / "train_log.jsonl")
        log_fns, probe, probe_model = [tracker.training_logger(), train_log], None, None
        if cfg.probe.enabled and is_main:
            if cfg.probe.bpb:
                probe_model = adapted_model(cfg.model, teacher_tokenizer, TransferResult.load(output_dir / INIT_DIR),
                                            student_tokenizer).to(eval_device(cfg.eval))
            probe = build_probe(cfg, documents=documents, teacher=teacher, student=student, overlap=overlap,
                                teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer,
                                eval_model=probe_model, log_fn=tracker.log_metrics, device=accelerator.device)
            log_fns.append(probe)
            if not (mcfg.resume and (checkpoint_dir / CHECKPOINT_FILE).exists()):
                probe.start()
        result = matt.train(teacher, student, log_fns=log_fns, accelerator=accelerator)
        if probe is not None:
            probe.finish(int(result.metrics["steps"]), float(result.metrics["wall_clock_s"]))
            write_probe_rows(probe.rows, output_dir / "probe.jsonl")
            tracker.log_artifact(output_dir / "probe.jsonl", "probe")
        del teacher_model, student_model, matt, teacher, student, probe, probe_model
        release_memory()
        if not is_main:
            return None
        result.save(output_dir / "embeddings")
        if cfg.tracking.log_embeddings:
            tracker.log_artifacts(output_dir / "embeddings", "embeddings")
        tracker.log_metrics(numeric_metrics(result.metrics, "train/final_"), step=cfg.train.max_steps)

        # 7. the adapted model: the learned embeddings in a fresh full-depth teacher, saved with the tokenizer
        final_model = adapted_model(cfg.model, teacher_tokenizer, result, student_tokenizer)
        if cfg.save_model:
            final_model.save_pretrained(str(output_dir / "model"))
            student_tokenizer.save_pretrained(str(output_dir / "model"))
            if cfg.tracking.log_model:
                tracker.log_artifacts(output_dir / "model", "model")

        # 8. evaluation of original / init / final on one suite (original and init cached across jobs)
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
                model = adapted_model(cfg.model, teacher_tokenizer, TransferResult.load(init_file), student_tokenizer)
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

        # 9. training curves
        rows = train_log.read()
        if rows:
            tracker.log_artifact(plot_training_curves({label: rows}, output_dir / "plots" / "loss.png"), "plots")
        tracker.log_metrics({"job/wall_clock_s": time.perf_counter() - started})
        logger.info("Transfer done: %s", output_dir)
    bpb = results.get("final", {}).get("bpb")
    finished_file.write_text(json.dumps({"max_steps": cfg.train.max_steps, "bpb": bpb, "run_id": tracker.run_id}))
    return bpb


if __name__ == "__main__":
    share_run_stamp_across_processes()  # all ranks of `accelerate launch` write to one run directory
    main()
