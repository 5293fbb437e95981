"""Training step: `MATTConfig` from the `train`/`objective`/`data` groups, adapters, the run.

The groups' schemas are `MATTConfig`'s own settings classes (`matt.config`), so `matt_config` takes
their fields as they are, and `MATTConfig`'s validation errors already name the Hydra key.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def dataset_cache_dir(cfg) -> str:
    return str(cfg.data.cache_dir or Path(cfg.paths.cache_dir) / "datasets")


def matt_config(cfg, *, checkpoint_dir: str | Path | None = None):
    """The `MATTConfig` of a composed transfer config (raises `ValueError` naming the Hydra key)."""
    from matt.config import GROUPS, MATTConfig

    values = {name: cfg[group][name] for group, settings in GROUPS.items()
              for name in settings.__dataclass_fields__}
    return MATTConfig(**values | dict(
        cache_dir=dataset_cache_dir(cfg), checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
        resume=bool(cfg.train.resume and checkpoint_dir is not None), extra={"name": cfg.name}))


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

    from matt.config import resolve_mixed_precision

    # torch 2.13 renamed the DDP flag; accelerate still passes the old name, which keeps the
    # semantics we want (no sync at init either: every rank loaded identical frozen rows).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    cpu = bool(cfg.train.cpu) or distributed_on_cpu()
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.precision, cpu=cpu), cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def build_adapters(cfg, matt, teacher_model, student_model, n_layers: int):
    """Wrap teacher and student for AIM at depth `n_layers` (preflight's `Plan.n_layers`) in place
    (both models are consumed): `(teacher, student)`, the student's shared rows frozen when
    `objective.freeze_shared`."""
    from matt.modeling import adapter_for

    with_ntp = cfg.objective.with_ntp
    adapter = adapter_for(teacher_model)
    rows = teacher_model.get_input_embeddings().weight.shape[0]
    # An all-frozen teacher keeps its embeddings in the model dtype (no float32 master copy).
    teacher = adapter(teacher_model, n_layers=n_layers, frozen_embeddings_mask=torch.ones(rows, dtype=torch.bool))
    mask = matt.prepare_frozen_embeddings_mask() if cfg.objective.freeze_shared else None
    student = adapter(student_model, n_layers=n_layers, frozen_embeddings_mask=mask, with_ntp=with_ntp)
    if student.is_tied:  # the output side exists from here on (a probe measures it from step 0)
        student.set_output_mode(cfg.objective.output_embeddings)
    logger.info("Training %s (AIM %s, loss %s) at n_layers=%d of %d, with_ntp=%s, %s; %d trainable embedding rows",
                cfg.objective.name, cfg.objective.aim_impl, cfg.objective.loss, n_layers,
                student.original_num_layers, with_ntp,
                f"output_embeddings={cfg.objective.output_embeddings}" if student.is_tied
                else "untied LM head",
                sum(p.shape[0] for p in student.trainable_parameters()))
    return teacher, student
