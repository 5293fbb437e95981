"""Training step: `MATTConfig` from the `train`/`objective`/`data` groups, adapters, the run.

`MATTConfig` validates itself; its errors name its own fields, so `matt_config` translates them
back to the Hydra keys a user typed (`MATTConfig.lr` -> `train.lr`).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch

from matt.pipeline.config import enum_value

logger = logging.getLogger(__name__)

HYDRA_KEYS = {
    "max_steps": "train.max_steps", "max_wall_clock_s": "train.max_wall_clock_s", "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clip_val": "train.gradient_clip_val", "lr": "train.lr", "weight_decay": "train.weight_decay",
    "adam_betas": "train.adam_betas", "num_warmup_steps": "train.num_warmup_steps",
    "num_decay_steps": "train.num_decay_steps", "seed": "train.seed", "precision": "train.precision",
    "cpu": "train.cpu", "log_every_n_steps": "train.log_every_n_steps",
    "save_every_n_steps": "train.save_every_n_steps", "num_workers": "train.num_workers",
    "shuffle": "train.shuffle", "progress_bar": "train.progress_bar", "resume": "train.resume",
    "loss": "objective.loss", "aim_impl": "objective.aim_impl", "with_ntp": "objective.with_ntp",
    "output_embeddings": "objective.output_embeddings", "ntp_scope": "objective.ntp_scope", "max_length": "data.max_length",
    "num_proc": "data.num_proc", "dataset_cache_dir": "data.cache_dir",
}


def resolved_with_ntp(cfg) -> bool:
    """`objective.with_ntp`, defaulting to the model's recommendation (`model.with_ntp`)."""
    with_ntp = cfg.objective.with_ntp
    return bool(cfg.model.with_ntp if with_ntp is None else with_ntp)


def resolved_n_layers(cfg) -> int:
    return int(cfg.objective.n_layers if cfg.objective.n_layers is not None else cfg.model.n_layers)


def dataset_cache_dir(cfg) -> str:
    return str(cfg.data.cache_dir or Path(cfg.paths.cache_dir) / "datasets")


def matt_config(cfg, *, checkpoint_dir: str | Path | None = None):
    """The `MATTConfig` of a composed transfer config; errors name the Hydra key."""
    from matt.config import MATTConfig

    train = cfg.train
    values = dict(
        max_steps=train.max_steps, max_wall_clock_s=train.max_wall_clock_s, batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, gradient_clip_val=train.gradient_clip_val,
        lr=train.lr, weight_decay=train.weight_decay, adam_betas=tuple(train.adam_betas),
        num_warmup_steps=train.num_warmup_steps, num_decay_steps=train.num_decay_steps, seed=train.seed,
        loss=enum_value(cfg.objective.loss), aim_impl=enum_value(cfg.objective.aim_impl),
        with_ntp=resolved_with_ntp(cfg), output_embeddings=enum_value(cfg.objective.output_embeddings),
        ntp_scope=enum_value(cfg.objective.ntp_scope), max_length=cfg.data.max_length, text_column="text", dataset_cache_dir=dataset_cache_dir(cfg),
        num_proc=cfg.data.num_proc, num_workers=train.num_workers, shuffle=train.shuffle,
        precision=str(train.precision), cpu=train.cpu, log_every_n_steps=train.log_every_n_steps,
        save_every_n_steps=train.save_every_n_steps,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
        resume=bool(train.resume and checkpoint_dir is not None), progress_bar=train.progress_bar,
        extra={"name": cfg.name},
    )
    try:
        return MATTConfig(**values)
    except ValueError as exc:
        match = re.search(r"MATTConfig\.(\w+)=", str(exc))
        if match and match.group(1) in HYDRA_KEYS:
            raise ValueError(f"{HYDRA_KEYS[match.group(1)]}: {exc}") from exc
        raise


def distributed_on_cpu() -> bool:
    """Launched as several processes (accelerate launch / torchrun) on a machine without CUDA.

    Accelerate only sets up CPU data parallelism (gloo) when told `cpu=True`, and its own `--cpu`
    flag falls back to a single process, so MATT asks for CPU itself in that case."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(cfg):
    """The run's Accelerator. Buffers (the frozen embedding rows among them) are not re-broadcast
    every step under DDP: they never change, and broadcasting them would dominate CPU steps."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from matt.config import PRECISIONS, resolve_mixed_precision

    # torch 2.13 renamed the DDP flag; accelerate still passes the old name, which keeps the
    # semantics we want (no sync at init either: every rank loaded identical frozen rows).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    cpu = bool(cfg.train.cpu) or distributed_on_cpu()
    precision = str(cfg.train.precision)
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is invalid: choose one of {sorted(PRECISIONS)}")
    return Accelerator(mixed_precision=resolve_mixed_precision(precision, cpu=cpu), cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def build_adapters(cfg, matt, teacher_model, student_model):
    """Wrap teacher and student for AIM (in place: both models are consumed): `(teacher, student)`,
    the student's shared rows frozen when `objective.freeze_shared`."""
    from matt.modeling import adapter_for

    n_layers = resolved_n_layers(cfg)
    with_ntp = resolved_with_ntp(cfg)
    adapter = adapter_for(teacher_model)
    rows = teacher_model.get_input_embeddings().weight.shape[0]
    # An all-frozen teacher keeps its embeddings in the model dtype (no float32 master copy).
    teacher = adapter(teacher_model, n_layers=n_layers, frozen_embeddings_mask=torch.ones(rows, dtype=torch.bool))
    mask = matt.prepare_frozen_embeddings_mask() if cfg.objective.freeze_shared else None
    student = adapter(student_model, n_layers=n_layers, frozen_embeddings_mask=mask, with_ntp=with_ntp)
    if student.is_tied:  # the output side exists from here on (a probe measures it from step 0)
        student.set_output_mode(enum_value(cfg.objective.output_embeddings))
    logger.info("Training %s (AIM %s, loss %s) at n_layers=%d of %d, with_ntp=%s, %s; %d trainable embedding rows",
                cfg.objective.name, enum_value(cfg.objective.aim_impl), enum_value(cfg.objective.loss), n_layers,
                student.original_num_layers, with_ntp,
                f"output_embeddings={enum_value(cfg.objective.output_embeddings)}" if student.is_tied
                else "untied LM head",
                sum(p.shape[0] for p in student.trainable_parameters()))
    return teacher, student
