"""The MATT training loop: plain Accelerate, one readable step.

Per optimizer step, for each micro-batch:
  1. teacher forward (inference mode, truncated at the AIM layer) -> attention probs + values;
  2. student forward (only input embeddings — and optionally the LM head — are trainable);
  3. AIM loss between the two at the AIM layer, plus an optional NTP term scaled to AIM's size;
  4. backward; then clip, step, schedule, log, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from matt.config import MATTConfig
from matt.objectives import aim_loss, hidden_state_loss
from matt.result import TransferResult
from matt.schedule import wsd_scheduler

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
CHECKPOINT_FILE = "trainer_state.pt"


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-pad) target positions."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


def estimate_step_flops(teacher: torch.nn.Module, student: torch.nn.Module, teacher_tokens: int, student_tokens: int) -> float:
    """Rough FLOPs of one micro-batch: 2·P·T for the teacher forward, 4·P·T for the student
    forward + activation backward (frozen weights get no weight-gradient GEMMs). P counts the
    non-embedding parameters that run; attention's L² terms are ignored (documented estimate)."""

    def active_params(adapter) -> int:
        return sum(p.numel() for n, p in adapter.named_parameters() if "embed" not in n and "lm_head" not in n)

    return 2.0 * active_params(teacher) * teacher_tokens + 4.0 * active_params(student) * student_tokens


def _budget_spent(budget_s: float | None, t0: float, accelerator) -> bool:
    """Whether the training-time budget is spent; every process takes the main process's answer."""
    if budget_s is None:
        return False
    spent = torch.tensor(float(time.perf_counter() - t0 >= budget_s), device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        spent = broadcast(spent, from_process=0)
    return bool(spent.item())


class _EpochBatches:
    """Endless, resumable stream of batches: epoch e is the dataset shuffled with seed + e."""

    def __init__(self, dataset, config: MATTConfig, collate_fn, accelerator, epoch: int = 0, skip: int = 0):
        self.dataset, self.config, self.collate_fn, self.accelerator = dataset, config, collate_fn, accelerator
        self.epoch, self.batch_in_epoch = epoch, skip

    def _loader(self) -> Iterator[dict[str, torch.Tensor]]:
        data = self.dataset.shuffle(seed=self.config.seed + self.epoch) if self.config.shuffle else self.dataset
        loader = DataLoader(data, batch_size=self.config.batch_size, collate_fn=self.collate_fn,
                            num_workers=self.config.num_workers, drop_last=False)
        loader = self.accelerator.prepare_data_loader(loader)
        if self.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.batch_in_epoch)
        return iter(loader)

    def __iter__(self):
        while True:
            resumed_at_end = self.batch_in_epoch > 0  # a checkpoint taken after an epoch's last batch
            produced = False
            for batch in self._loader():
                produced = True
                self.batch_in_epoch += 1
                yield batch
            if not produced and not resumed_at_end:
                raise ValueError("The prepared dataset yields no batches (is it empty?)")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def _save_checkpoint(directory: Path, position: tuple[int, int, int], params, optimizer, scheduler,
                     config: MATTConfig) -> Path:
    """Trainable tensors + optimizer + scheduler + RNG + data position, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    step, epoch, batch_in_epoch = position
    state = {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "trainable": [p.detach().cpu().clone() for p in params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "config": config.to_dict(),
    }
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    (directory / "trainer_state.json").write_text(json.dumps({k: state[k] for k in ("step", "epoch", "batch_in_epoch")}))
    return path


def _load_checkpoint(directory: Path, params, optimizer, scheduler) -> dict[str, Any] | None:
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if len(state["trainable"]) != len(params) or any(
        saved.shape != p.shape for saved, p in zip(state["trainable"], params)
    ):
        raise ValueError(
            f"Checkpoint {path} does not match this run's trainable parameters "
            f"({[tuple(t.shape) for t in state['trainable']]} vs {[tuple(p.shape) for p in params]})"
        )
    with torch.no_grad():
        for saved, p in zip(state["trainable"], params):
            p.copy_(saved.to(p))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def train(
    config: MATTConfig,
    teacher,
    student,
    dataset,
    collate_fn,
    *,
    log_fns: list[LogFn] | None = None,
    accelerator=None,
) -> TransferResult:
    """Train the student's embeddings with AIM (+ optional NTP); returns the learned embeddings.

    `teacher` / `student` are `matt.modeling.PreTrainedModelForAIM` adapters; `dataset` is a
    prepared dataset (see `matt.data.prepare_dataset`) and `collate_fn` an `AIMCollator`.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from matt.modeling import check_compatible

    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    set_seed(config.seed)
    check_compatible(teacher, student)
    log_fns = log_fns or []

    # ---- what trains: input embeddings (non-frozen rows), and the LM head where the run says so
    if student.is_tied:
        student.set_output_mode(config.output_embeddings)
    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout: AIM compares deterministic attention patterns
    params = student.trainable_parameters()
    if not params:
        raise ValueError("The student has no trainable parameters (is every embedding row frozen?)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    scheduler = wsd_scheduler(optimizer, config.max_steps, config.num_warmup_steps, config.num_decay_steps)
    teacher.to(accelerator.device)
    student, optimizer = accelerator.prepare(student, optimizer)
    student_module = accelerator.unwrap_model(student)

    # ---- resume: trainable tensors, optimizer, scheduler, RNG and data position
    start_step, epoch, skip = 0, 0, 0
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume and ckpt_dir is not None:
        state = _load_checkpoint(ckpt_dir, params, optimizer, scheduler)
        if state is None:
            logger.warning("resume=True but no checkpoint in %s: starting from step 0", ckpt_dir)
        else:
            start_step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
            logger.info("Resumed from %s at step %d (epoch %d, batch %d)", ckpt_dir, start_step, epoch, skip)
    batches = _EpochBatches(dataset, config, collate_fn, accelerator, epoch=epoch, skip=skip)
    stream = iter(batches)

    use_aim, use_ntp = config.aim_impl != "none", config.with_ntp
    use_hidden = config.aim_impl == "hidden"  # hidden-state distillation at the AIM layer instead of AIM
    accum = config.gradient_accumulation_steps
    last: dict[str, float] = {}
    window_tokens, window_start, total_flops, t0 = 0, time.perf_counter(), 0.0, time.perf_counter()
    progress = tqdm(total=config.max_steps, initial=start_step, desc="MATT", dynamic_ncols=True,
                    disable=not (config.progress_bar and accelerator.is_main_process))

    # (steps done, epoch, batch in epoch) after the last completed optimizer step: what a
    # checkpoint written after a crash or Ctrl-C must describe, so no finished step is lost.
    completed = (start_step, batches.epoch, batches.batch_in_epoch)
    try:
        for step in range(start_step, config.max_steps):
            sums = {"loss": 0.0, "aim_loss": 0.0, "ntp_loss": 0.0, "ntp_scale": 0.0}
            for micro in range(accum):
                batch = next(stream)
                t_ids, t_mask, t_seg = batch["teacher_input_ids"], batch["teacher_attention_mask"], batch["teacher_segment_ids"]
                s_ids, s_mask, s_seg = batch["student_input_ids"], batch["student_attention_mask"], batch["student_segment_ids"]

                # 1. teacher: no graph at all; clone so the loss may save these tensors for backward
                with torch.inference_mode(), accelerator.autocast():
                    t_out = teacher(t_ids.to(accelerator.device), t_mask.to(accelerator.device),
                                    return_hidden=use_hidden)
                t_attn, t_values = t_out.attn_probs.clone(), t_out.values.clone()

                sync = accelerator.no_sync(student) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    # 2. student
                    with accelerator.autocast():
                        s_out = student(s_ids, s_mask, return_logits=use_ntp,
                                        detach_head_input=config.ntp_scope == "head", return_hidden=use_hidden)
                        # 3. objective
                        if use_hidden:
                            aim = hidden_state_loss(t_out.hidden_states, t_seg.to(t_attn.device), s_out.hidden_states,
                                                    s_seg, loss=config.loss)
                        else:
                            aim = (aim_loss(t_attn, t_values, t_seg.to(t_attn.device), s_out.attn_probs, s_out.values,
                                            s_seg, impl=config.aim_impl, loss=config.loss)
                                   if use_aim else torch.zeros((), device=accelerator.device))
                        if use_ntp:
                            ntp = next_token_loss(s_out.logits, s_ids, s_mask)
                            # dynamic scaling keeps both terms the same size; the scale carries no gradient
                            scale = (aim / ntp).detach() if use_aim else torch.ones((), device=ntp.device)
                            loss = aim + scale * ntp
                        else:
                            ntp, scale, loss = torch.zeros(()), torch.zeros(()), aim
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"Non-finite loss at step {step} (aim={aim.item()}, ntp={ntp.item()}); "
                                "lower lr or use precision=32"
                            )
                    # 4. backward
                    accelerator.backward(loss / accum)

                sums["loss"] += loss.item() / accum
                sums["aim_loss"] += aim.item() / accum
                sums["ntp_loss"] += ntp.item() / accum
                sums["ntp_scale"] += scale.item() / accum
                n_t, n_s = int(t_mask.sum()), int(s_mask.sum())
                window_tokens += n_s
                total_flops += estimate_step_flops(teacher, student_module, n_t, n_s)

            # 5. clip, step, schedule
            if config.gradient_clip_val:
                grad_norm = accelerator.clip_grad_norm_(params, config.gradient_clip_val)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            completed = (done, batches.epoch, batches.batch_in_epoch)
            progress.update(1)
            progress.set_postfix(loss=f"{sums['loss']:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

            # the wall-clock budget ends training at this step boundary (logged and checkpointed as the last)
            out_of_time = _budget_spent(config.max_wall_clock_s, t0, accelerator)
            last_step = done == config.max_steps or out_of_time

            # 6. log
            if done % config.log_every_n_steps == 0 or last_step:
                now = time.perf_counter()
                last = {
                    **sums,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                    "flops": total_flops,
                    "elapsed_s": now - t0,
                    "epoch": batches.epoch,
                }
                window_tokens, window_start = 0, now
                if accelerator.is_main_process:
                    for fn in log_fns:
                        fn(last, done)

            # 7. checkpoint
            if ckpt_dir is not None and accelerator.is_main_process and (
                (config.save_every_n_steps and done % config.save_every_n_steps == 0) or last_step
            ):
                _save_checkpoint(ckpt_dir, completed, params, optimizer, scheduler, config)
            accelerator.wait_for_everyone()
            if out_of_time:
                logger.info("Wall-clock budget of %.0f s spent after %d of %d steps", config.max_wall_clock_s, done,
                            config.max_steps)
                break
    except BaseException:
        if ckpt_dir is not None and accelerator.is_main_process and completed[0] > start_step:
            path = _save_checkpoint(ckpt_dir, completed, params, optimizer, scheduler, config)
            logger.error("Training interrupted after step %d; state saved to %s (resume=True continues)",
                         completed[0], path)
        raise

    progress.close()
    if not math.isfinite(last.get("loss", 0.0)):
        raise FloatingPointError("Training ended with a non-finite loss")
    output = student_module.output_embedding_weight()
    tied = output is None
    return TransferResult(
        input_embeddings=student_module.input_embedding_weight().float().cpu(),
        output_embeddings=None if tied else output.float().cpu(),
        tie_word_embeddings=tied,
        metrics={**last, "steps": completed[0], "wall_clock_s": time.perf_counter() - t0},
    )

