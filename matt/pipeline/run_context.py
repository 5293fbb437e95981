"""Where and as what a job runs: its run-directory stamp, output directory, Hydra job info, label, train log.

Shared by the recipes (`transfer`, `recover`, `evaluate`) and by `matt.hydra_app` (the `${matt_stamp:}`
resolver); it imports nothing from the recipes, so every one of them can import it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any


STAMP_ENV = "MATT_RUN_STAMP"
"""Set (by rank 0 under a distributed launch, or by the user) to force the run directory's stamp."""


def new_run_stamp() -> str:
    """`<date>_<time>_<6 hex digits>`: sortable by start time, unique per job."""
    return f"{_dt.datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


def run_stamp() -> str:
    """`$MATT_RUN_STAMP`, else a new stamp (the `${matt_stamp:}` resolver)."""
    return os.environ.get(STAMP_ENV) or new_run_stamp()


def job_output_dir(cfg) -> Path:
    """Hydra's output directory of this job (or `<output_root>/runs/<name>/<stamp>` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        directory = Path(HydraConfig.get().runtime.output_dir)
    else:
        directory = Path(cfg.paths.output_root) / "runs" / cfg.name / run_stamp()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def hydra_job(cfg) -> dict[str, Any]:
    """Overrides, job number and sweep of the current Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    info: dict[str, Any] = {"overrides": hydra_cfg.job.override_dirname or "", "mode": hydra_cfg.mode.name}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        info["job_num"] = hydra_cfg.job.num
        info["sweep_dir"] = str(Path(hydra_cfg.sweep.dir).resolve())
        info["sweep_id"] = f"{cfg.name}/{Path(hydra_cfg.sweep.dir).name}"
    return info


def method_label(cfg, n_layers: int, with_ntp: bool, tied: bool) -> str:
    """Short name of the method for tables, e.g. `aim mse L10 keep_init`."""
    if cfg.label:
        return str(cfg.label)
    parts = [str(cfg.objective.name)]
    head_only = with_ntp and cfg.objective.ntp_scope == "head"
    if cfg.objective.aim_impl != "none":
        parts += [str(cfg.objective.loss), f"L{n_layers}"]
        if with_ntp and cfg.objective.name != "aim_ntp":
            parts.append("+ntp(head)" if head_only else "+ntp")
        elif head_only:
            parts.append("(ntp: head)")
    output = str(cfg.objective.output_embeddings)
    if tied and output != "tied" and not (output == "ntp" and with_ntp):  # an NTP-trained head is implied
        parts.append(output)
    if not cfg.objective.freeze_shared:
        parts.append("unfrozen")
    return " ".join(parts)


class JsonlLog:
    """A trainer log function appending `{"step": s, ...metrics}` lines (survives resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def read(self) -> list[dict[str, float]]:
        """Logged steps in order; a step logged twice (before a crash and after resuming) keeps the last."""
        if not self.path.exists():
            return []
        by_step = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row
        return [by_step[s] for s in sorted(by_step)]
