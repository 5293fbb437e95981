"""Evaluate a model with the `eval` group, tracked in one MLflow run: a saved model directory
(+ tokenizer), or the original / initial / trained models of a finished transfer job.

    python experiments/evaluate.py model_dir=outputs/runs/smoke/<stamp>/model data=tiny_sample eval=quick
    python experiments/evaluate.py run_dir=outputs/runs/quality_gemma3/<stamp> data=manpages_uk eval=bpb_only \
        eval.split=test eval.max_bytes=null eval.init=true eval.final=true
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from matt.hydra_app import hydra_main
from matt.pipeline.documents import load_documents
from matt.pipeline.evaluate import EvalSuite, prefixed, results_table, write_results
from matt.pipeline.init import INIT_DIR, adapted_model, release_memory
from matt.pipeline.models import DTYPES, load_teacher_model, load_teacher_tokenizer
from matt.pipeline.run_context import job_output_dir
from matt.result import TransferResult
from matt.tracking import flatten, open_tracker


@hydra_main("evaluate")
def main(cfg) -> dict[str, float]:
    """The models' metrics, named `<prefix>/<metric>` as in MLflow."""
    if (cfg.model_dir is None) == (cfg.run_dir is None):
        raise ValueError("Give exactly one of model_dir=<HF model directory> and run_dir=<transfer job directory>")
    output_dir = job_output_dir(cfg)

    # 1. the models to score (loaded one at a time) and the tokenizers
    if cfg.model_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model_dir)
        teacher_tokenizer = student_tokenizer = None
        models = {cfg.prefix: (lambda: AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=DTYPES[cfg.dtype]),
                               tokenizer)}
    else:
        run_dir = Path(cfg.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"run_dir={run_dir}: no config.yaml there (not a transfer job's directory)")
        model_cfg = OmegaConf.load(run_dir / "config.yaml").model
        tokenizer = teacher_tokenizer = load_teacher_tokenizer(model_cfg)
        student_tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))

        def adapted(directory: str):
            return lambda: adapted_model(model_cfg, teacher_tokenizer, TransferResult.load(run_dir / directory),
                                         student_tokenizer)

        chosen = {"original": (lambda: load_teacher_model(model_cfg, teacher_tokenizer), teacher_tokenizer),
                  "init": (adapted(INIT_DIR), student_tokenizer), "final": (adapted("embeddings"), student_tokenizer)}
        models = {name: chosen[name] for name in ("original", "init", "final") if cfg.eval[name]}

    # 2. the evaluated text and items: the `data` group's documents, capped by the `eval` group
    suite = EvalSuite.build(cfg.eval, load_documents(cfg.data, tokenizer), teacher_tokenizer=teacher_tokenizer,
                            student_tokenizer=student_tokenizer)

    # 3. score every model on them, in one MLflow run
    tracker = open_tracker(cfg.tracking, output_root=cfg.paths.output_root, run_name=f"evaluate {cfg.prefix}",
                           tags={"matt.kind": "evaluate", "matt.model_dir": str(cfg.model_dir or cfg.run_dir)})
    results = {}
    with tracker.run():
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
        tracker.log_metrics(suite.describe())
        for name, (load, model_tokenizer) in models.items():
            model = load().eval()
            results[name] = suite.run(model, model_tokenizer, name=name)
            del model
            release_memory()

        # 4. numbers to MLflow, eval/results.{json,md} to the job directory, the table to stdout
        tracker.log_metrics(prefixed(results))
        for path in write_results(results, output_dir / "eval", {"skipped": suite.skipped, **suite.describe()}):
            tracker.log_artifact(path, "eval")
        print(results_table(results), flush=True)
    return prefixed(results)


if __name__ == "__main__":
    main()
