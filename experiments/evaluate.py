"""Evaluate a saved model directory (+ tokenizer) with the `eval` group, tracked in one MLflow run.

    python experiments/evaluate.py model_dir=outputs/runs/smoke/<stamp>/model data=tiny_sample eval=quick
"""

from __future__ import annotations

from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from matt.hydra_app import hydra_main
from matt.pipeline.documents import load_documents
from matt.pipeline.evaluate import EvalSuite, prefixed, results_table, write_results
from matt.pipeline.models import DTYPES
from matt.pipeline.run_context import job_output_dir
from matt.tracking import flatten, open_tracker


@hydra_main("evaluate")
def main(cfg) -> dict[str, float]:
    """The model's metrics, named `<prefix>/<metric>` as in MLflow."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is invalid: choose one of {sorted(DTYPES)}")
    output_dir = job_output_dir(cfg)

    # 1. the evaluated text and items: the `data` group's documents, capped by the `eval` group
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model_dir)
    suite = EvalSuite.build(cfg.eval, load_documents(cfg.data, tokenizer))

    # 2. score the model on them, in one MLflow run
    tracker = open_tracker(cfg.tracking, output_root=cfg.paths.output_root, run_name=f"evaluate {cfg.prefix}",
                           tags={"matt.kind": "evaluate", "matt.model_dir": cfg.model_dir})
    with tracker.run():
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
        tracker.log_metrics(suite.describe())
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=DTYPES[cfg.dtype]).eval()
        results = {cfg.prefix: suite.run(model, tokenizer, name=cfg.prefix)}

        # 3. numbers to MLflow, eval/results.{json,md} to the job directory, the table to stdout
        tracker.log_metrics(prefixed(results))
        for path in write_results(results, output_dir / "eval", {"skipped": suite.skipped}):
            tracker.log_artifact(path, "eval")
        print(results_table(results), flush=True)
    return prefixed(results)


if __name__ == "__main__":
    main()
