"""Where and as what a job runs: run-directory stamp, output directory, Accelerator, the started job
(start_job), Hydra job info, label, MLflow run, train log. Shared by the recipes (`experiments/*.py`,
`recover`) and `matt.hydra_app`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from matt.config import MATTConfig
from matt.pipeline.config import matt_config
from matt.pipeline.preflight import Plan, preflight
from matt.tracking import flatten, open_tracker, save_run_reference


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


def distributed_on_cpu() -> bool:
    """Several processes (accelerate launch / torchrun) without CUDA: Accelerate sets up CPU data
    parallelism (gloo) only when told `cpu=True`, and its own `--cpu` flag falls back to one process."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(cfg):
    """The job's Accelerator. Buffers (the frozen embedding rows among them) are not re-broadcast
    every step under DDP: they never change, and broadcasting them would dominate CPU steps."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from matt.config import resolve_mixed_precision

    # torch 2.13 renamed the DDP flag; accelerate still passes the old name, which keeps the
    # semantics we want (no sync at init either: every rank loaded identical frozen rows).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    cpu = bool(cfg.train.cpu) or distributed_on_cpu()
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.precision, cpu=cpu), cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


class Job(NamedTuple):
    """A started job (start_job)."""

    output_dir: Path
    checkpoint_dir: Path
    plan: Plan
    accelerator: Any
    settings: MATTConfig


def start_job(cfg) -> Job | None:
    """The job's output directory, preflight's Plan (validated before any heavy work), its Accelerator and
    training settings; None on a dry run (`dry_run=true`, after printing the plan)."""
    output_dir = job_output_dir(cfg)
    plan = preflight(cfg)
    if cfg.dry_run:
        print(f"Config OK (dry run): {json.dumps(plan.summary(), default=str)}", flush=True)
        return None
    checkpoint_dir = output_dir / "checkpoints"
    return Job(output_dir, checkpoint_dir, plan, make_accelerator(cfg), matt_config(cfg, checkpoint_dir=checkpoint_dir))


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


def open_job_tracker(cfg, job: Job, *, kind: str, label: str, **tags):
    """The job's tracker (MLflow run: `matt.*` tags, run name = the Hydra overrides; reopened when
    `train.resume`), its reference saved in the checkpoint directory; extra `tags` go in as `matt.<name>`."""
    plan, is_main = job.plan, job.accelerator.is_main_process
    hydra_info = hydra_job(cfg)
    tags = {"kind": kind, "experiment": cfg.name, "label": label, "model": cfg.model.name,
            "objective": cfg.objective.name, "aim_impl": str(cfg.objective.aim_impl), "loss": str(cfg.objective.loss),
            "n_layers": plan.n_layers, "with_ntp": str(plan.with_ntp).lower(), "init": str(cfg.init.method),
            "output_dir": str(job.output_dir.resolve()), **tags, **hydra_info}
    tracker = open_tracker(cfg.tracking, output_root=cfg.paths.output_root, is_main_process=is_main,
                           run_name=cfg.tracking.run_name or hydra_info.get("overrides") or cfg.name,
                           tags={f"matt.{k}": v for k, v in tags.items()},
                           resume_from=job.checkpoint_dir if cfg.train.resume else None)
    if is_main:
        save_run_reference(tracker, job.checkpoint_dir)
    return tracker


def log_job_config(tracker, cfg, output_dir: Path, **resolved) -> None:
    """`<output_dir>/config.yaml` (also an artifact) and the flattened config + `resolved.*` as params."""
    from omegaconf import OmegaConf

    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    params = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    tracker.log_params({**params, **{f"resolved.{k}": v for k, v in resolved.items()}})
    tracker.log_artifact(output_dir / "config.yaml", "config")
    if tracker.resumed:
        tracker.set_tags({"matt.resumed": "true"})


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
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_step = {row["step"]: row for row in rows}
        return [by_step[s] for s in sorted(by_step)]
