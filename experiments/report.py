"""MLflow runs of an experiment -> markdown/CSV table (with % of the original model) and PNG plots.

    python experiments/report.py experiment_name=smoke
"""

from __future__ import annotations

from pathlib import Path

from matt.hydra_app import hydra_main
from matt.report import build_report
from matt.tracking import default_tracking_uri


@hydra_main("report")
def main(cfg) -> dict[str, Path]:
    """The written files by kind (table, csv, plots)."""
    uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.output_root)
    output_dir = cfg.output_dir or Path(cfg.paths.output_root) / "reports" / cfg.experiment_name
    return build_report(uri, cfg.experiment_name, output_dir, metrics=list(cfg.metrics),
                        include_failed=cfg.include_failed)


if __name__ == "__main__":
    main()
