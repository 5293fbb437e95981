"""Evaluate a saved model directory (+ tokenizer) with the `eval` group.

    python experiments/evaluate.py model_dir=outputs/runs/smoke/<stamp>/model data=tiny_sample eval=quick
"""

from matt.hydra_app import evaluate

if __name__ == "__main__":
    evaluate()
