"""MLflow runs of an experiment -> markdown/CSV table (with % of the original model) and PNG plots.

    python experiments/report.py experiment_name=smoke
"""

from matt.hydra_app import report

if __name__ == "__main__":
    report()
