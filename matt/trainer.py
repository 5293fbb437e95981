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
from torch.utils.data import DataLoader

from matt.config import MATTConfig
from matt.objectives import aim_loss, hidden_state_loss
from matt.result import TransferResult
from matt.schedule import wsd_scheduler

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
CHECKPOINT_FILE = "trainer_state.pt"
PREVIOUS_CHECKPOINT_FILE = "trainer_state.prev.pt"
"""The checkpoint before the latest one, kept so an unreadable latest one is not the end of the run."""
ROW_NORM_WARN = 10.0
ROW_NORM_LIMIT = 100.0
"""Largest input-embedding row norm of the student, as a multiple of the teacher's largest row norm:
above ROW_NORM_WARN a warning, above ROW_NORM_LIMIT (or non-finite) the run stops as diverged. RMSNorm
hides the rows' scale from the AIM loss, so a divergence would otherwise finish with a small loss."""


def next_token_loss(student, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-pad) target positions, from the LM head's input
    `hidden_states`, computed in chunks by `student.lm_head_loss`. With `max_tokens`, at most that
    many of the real positions, drawn uniformly without replacement (torch's global generator), are
    scored: an unbiased estimate of the same mean whose cost in the head (one product with every
    vocabulary row per scored token) no longer grows with the batch."""
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    keep = attention_mask[:, 1:].reshape(-1).nonzero().squeeze(1)
    if max_tokens is not None and keep.numel() > max_tokens:
        keep = keep[torch.randperm(keep.numel(), device=keep.device)[:max_tokens]]
    return student.lm_head_loss(hidden[keep], targets[keep], ignore_index=-100)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


def active_params(adapter: torch.nn.Module) -> int:
    """The non-embedding parameters that run (P of the FLOPs estimate)."""
    return sum(p.numel() for n, p in adapter.named_parameters() if "embed" not in n and "lm_head" not in n)


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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            data = self.dataset.shuffle(seed=self.config.seed + self.epoch) if self.config.shuffle else self.dataset
            loader = DataLoader(data, batch_size=self.config.batch_size, collate_fn=self.collate_fn,
                                num_workers=self.config.num_workers, drop_last=False)
            loader = self.accelerator.prepare_data_loader(loader)
            if self.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, self.batch_in_epoch)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            if self.batch_in_epoch == 0:  # (> 0 without a batch here: resumed after the epoch's last batch)
                raise ValueError("The prepared dataset yields no batches (is it empty?)")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def _non_finite_state(params, optimizer) -> str | None:
    """What in the trainable parameters or the optimizer state is NaN/inf (None when all finite)."""
    for i, p in enumerate(params):
        if not torch.isfinite(p.detach()).all():
            return f"trainable parameter {i} {tuple(p.shape)} is non-finite"
    for i, state in enumerate(optimizer.state.values()):
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"optimizer state {name!r} of parameter {i} is non-finite"
    return None


def check_finite_update(params, grad_norm: torch.Tensor, step: int) -> None:
    """Raise before the optimizer step when it would write NaN/inf into the trainable rows."""
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"Non-finite gradient norm ({float(grad_norm)}) at step {step}: the update was not "
                                 "applied; lower lr or use precision=32")
    for i, p in enumerate(params):
        if not torch.isfinite(p.detach()).all():
            raise FloatingPointError(f"Non-finite values in trainable parameter {i} {tuple(p.shape)} before step "
                                     f"{step} (the previous update overflowed): lower lr")


def row_norms(weight: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """L2 norm of every row, in float32 chunks, scaled by the row's largest |value| so that huge
    finite rows do not overflow (NaN/inf rows give NaN/inf)."""
    norms = []
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk].detach().float()
        scale = rows.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        norms.append((rows / scale[:, None]).norm(dim=-1) * scale)
    return torch.cat(norms) if norms else torch.zeros(0)


def embedding_row_norms(student_module, teacher_max_norm: float) -> dict[str, float]:
    """Norms of the student's trainable input-embedding rows (the frozen ones are the teacher's),
    and the largest one relative to the teacher's largest."""
    norms = row_norms(student_module.input_embeddings.trainable)
    if norms.numel() == 0:
        return {}
    largest = float(norms.max())
    return {"embed_row_norm_mean": float(norms.mean()), "embed_row_norm_max": largest,
            "embed_row_norm_ratio": largest / max(teacher_max_norm, 1e-12)}


def check_row_norms(norms: dict[str, float], step: int, warned: list[bool]) -> None:
    """Stop a diverged run (rows far outside the teacher's scale); warn once when they drift."""
    ratio = norms.get("embed_row_norm_ratio", 0.0)
    if not ratio <= ROW_NORM_LIMIT:  # NaN / inf too
        raise FloatingPointError(
            f"Diverged at step {step}: the largest student embedding row norm is {norms['embed_row_norm_max']:.4g}, "
            f"{ratio:.4g}x the teacher's largest (limit {ROW_NORM_LIMIT:g}x); lower lr")
    if ratio > ROW_NORM_WARN and not warned[0]:
        warned[0] = True
        logger.warning("Step %d: the largest student embedding row norm is %.3gx the teacher's largest "
                       "(warning above %gx, error above %gx); the lr may be too high", step, ratio, ROW_NORM_WARN,
                       ROW_NORM_LIMIT)


def _save_checkpoint(directory: Path, position: tuple[int, int, int], params, optimizer, scheduler,
                     config: MATTConfig, totals: dict[str, Any], row_norm_ratio: float) -> Path:
    """Trainable tensors + optimizer + scheduler + RNG + data position, written atomically.

    The checkpoint it replaces is kept as `trainer_state.prev.pt`. A non-finite state, or rows that
    diverged (`row_norm_ratio` above ROW_NORM_LIMIT), is never written (`FloatingPointError`): the
    last good checkpoint stays in place. `totals` holds the run's cumulative cost and last metrics,
    carried across resumes."""
    problem = _non_finite_state(params, optimizer)
    if problem is None and not row_norm_ratio <= ROW_NORM_LIMIT:  # `not <=`: a NaN ratio counts as diverged
        problem = f"the embedding rows diverged ({row_norm_ratio:.4g}x the teacher's largest row norm)"
    if problem is not None:
        raise FloatingPointError(f"Not saving a checkpoint at step {position[0]}: {problem}; "
                                 f"the previous checkpoint in {directory} is kept")
    directory.mkdir(parents=True, exist_ok=True)
    where = dict(zip(("step", "epoch", "batch_in_epoch"), position))
    state = {
        **where,
        "totals": totals,
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
    if path.exists():
        os.replace(path, directory / PREVIOUS_CHECKPOINT_FILE)
    os.replace(tmp, path)
    (directory / "trainer_state.json").write_text(json.dumps(where))
    return path


def _load_checkpoint(directory: Path, params, optimizer, scheduler) -> dict[str, Any] | None:
    """Restore the latest readable checkpoint: `trainer_state.pt`, else (unreadable or missing, e.g.
    a disk failure) the previous one, with an error naming the file that could not be read."""
    errors = []
    for path in (directory / CHECKPOINT_FILE, directory / PREVIOUS_CHECKPOINT_FILE):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            break
        except Exception as exc:  # truncated / corrupt file: torch's zip or unpickling errors
            logger.error("Checkpoint %s is unreadable (%s: %s)%s", path, type(exc).__name__, exc,
                         "; falling back to the previous checkpoint" if path.name == CHECKPOINT_FILE else "")
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    else:
        if errors:
            raise ValueError(f"No readable checkpoint in {directory}: {'; '.join(errors)}. Delete the "
                             "directory's trainer_state*.pt to start over")
        return None
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
    prepared dataset (see `matt.batches.prepare_dataset`) and `collate_fn` an `AIMCollator`.
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
    if student.is_tied and student.output_mode != config.output_embeddings:
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
    prior: dict[str, Any] = {}  # cost and last metrics of the attempts before this resume
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume and ckpt_dir is not None:
        state = _load_checkpoint(ckpt_dir, params, optimizer, scheduler)
        if state is None:
            logger.warning("resume=True but no checkpoint in %s: starting from step 0", ckpt_dir)
        else:
            start_step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
            prior = state.get("totals", {})
            logger.info("Resumed from %s at step %d (epoch %d, batch %d)", ckpt_dir, start_step, epoch, skip)
    if start_step >= config.max_steps:
        logger.warning("The checkpoint in %s is at step %d and max_steps=%d: training already finished, nothing "
                       "to do (raise max_steps to train further)", ckpt_dir, start_step, config.max_steps)
        return transfer_result(student_module, {**prior.get("metrics", {}), "steps": start_step,
                                        "wall_clock_s": prior.get("wall_clock_s", 0.0)})
    batches = _EpochBatches(dataset, config, collate_fn, accelerator, epoch=epoch, skip=skip)
    stream = iter(batches)

    use_aim, use_ntp = config.aim_impl != "none", config.with_ntp
    use_hidden = config.aim_impl == "hidden"  # hidden-state distillation at the AIM layer instead of AIM
    accum = config.gradient_accumulation_steps
    last: dict[str, float] = dict(prior.get("metrics", {}))
    # cost counts every attempt: wall clock (re-run steps included) and FLOPs of completed steps
    prior_wall_s = float(prior.get("wall_clock_s", 0.0))
    window_tokens, window_start, t0 = 0, time.perf_counter(), time.perf_counter()
    # time spent in the log functions (an evaluation probe may run there) is not training time: it
    # counts neither in the wall clock nor against `max_wall_clock_s`
    paused_s = 0.0
    total_flops = completed_flops = float(prior.get("flops", 0.0))
    # FLOPs of a micro-batch: 2·P·T for the teacher forward, 4·P·T for the student forward + activation
    # backward (frozen weights get no weight-gradient GEMMs); attention's L² terms are ignored (an estimate)
    teacher_params, student_params = active_params(teacher), active_params(student_module)
    teacher_table = teacher.input_embeddings  # its rows live in `frozen`, or `trainable` when no mask was given
    teacher_max_norm = float(torch.cat([row_norms(teacher_table.frozen), row_norms(teacher_table.trainable)]).max())
    norm_warned = [False]

    def totals() -> dict[str, Any]:
        return {"wall_clock_s": prior_wall_s + time.perf_counter() - t0 - paused_s, "flops": completed_flops,
                "metrics": last}

    def save_checkpoint() -> Path:
        ratio = embedding_row_norms(student_module, teacher_max_norm).get("embed_row_norm_ratio", 0.0)
        return _save_checkpoint(ckpt_dir, completed, params, optimizer, scheduler, config, totals(), ratio)

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
                t_ids, t_mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
                s_ids, s_mask = batch["student_input_ids"], batch["student_attention_mask"]
                t_seg, s_seg = batch["teacher_segment_ids"], batch["student_segment_ids"]

                # 1. teacher: no graph at all; clone so the loss may save these tensors for backward
                with torch.inference_mode(), accelerator.autocast():
                    t_out = teacher(t_ids.to(accelerator.device), t_mask.to(accelerator.device),
                                    return_aim_hidden=use_hidden)
                t_attn, t_values = t_out.attn_probs.clone(), t_out.values.clone()

                sync = accelerator.no_sync(student) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    # 2. student
                    with accelerator.autocast():
                        s_out = student(s_ids, s_mask, return_hidden_states=use_ntp,
                                        detach_head_input=config.ntp_scope == "head", return_aim_hidden=use_hidden)
                        # 3. objective
                        if use_hidden:
                            aim = hidden_state_loss(t_out.aim_hidden, t_seg.to(t_attn.device), s_out.aim_hidden,
                                                    s_seg, loss=config.loss)
                        else:
                            aim = (aim_loss(t_attn, t_values, t_seg.to(t_attn.device), s_out.attn_probs, s_out.values,
                                            s_seg, impl=config.aim_impl, loss=config.loss)
                                   if use_aim else torch.zeros((), device=accelerator.device))
                        if use_ntp:
                            ntp = next_token_loss(student_module, s_out.hidden_states, s_ids, s_mask,
                                                  max_tokens=config.ntp_max_tokens)
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

                for key, value in (("loss", loss), ("aim_loss", aim), ("ntp_loss", ntp), ("ntp_scale", scale)):
                    sums[key] += value.item() / accum
                n_t, n_s = int(t_mask.sum()), int(s_mask.sum())
                window_tokens += n_s
                total_flops += 2.0 * teacher_params * n_t + 4.0 * student_params * n_s

            # 5. clip, step, schedule
            if config.gradient_clip_val:
                grad_norm = accelerator.clip_grad_norm_(params, config.gradient_clip_val)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            check_finite_update(params, grad_norm, step)  # before AdamW could write NaN into every row
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            completed = (done, batches.epoch, batches.batch_in_epoch)
            completed_flops = total_flops
            progress.update(1)
            progress.set_postfix(loss=f"{sums['loss']:.4g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

            # the wall-clock budget ends training at this step boundary (logged and checkpointed as the last)
            out_of_time = _budget_spent(config.max_wall_clock_s, t0 + paused_s, accelerator)
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
                    "elapsed_s": prior_wall_s + now - t0 - paused_s,
                    "epoch": batches.epoch,
                    **embedding_row_norms(student_module, teacher_max_norm),
                }
                check_row_norms(last, done, norm_warned)
                if accelerator.is_main_process:
                    for fn in log_fns:
                        fn(last, done)
                paused_s += time.perf_counter() - now
                window_tokens, window_start = 0, time.perf_counter()

            # 7. checkpoint
            if ckpt_dir is not None and accelerator.is_main_process and (
                (config.save_every_n_steps and done % config.save_every_n_steps == 0) or last_step
            ):
                save_checkpoint()
            accelerator.wait_for_everyone()
            if out_of_time:
                logger.info("Wall-clock budget of %.0f s spent after %d of %d steps", config.max_wall_clock_s, done,
                            config.max_steps)
                break
    except BaseException as exc:
        if ckpt_dir is not None and accelerator.is_main_process and completed[0] > start_step:
            # never let a failing save (a full disk, a non-finite state) replace the real error
            try:
                path = save_checkpoint()
                logger.error("Training interrupted after step %d; state saved to %s (resume=True continues)",
                             completed[0], path)
            except Exception as save_exc:
                logger.error("Training failed (%s: %s); the emergency checkpoint was not written (%s: %s), so "
                             "resume=True continues from the last good checkpoint in %s", type(exc).__name__, exc,
                             type(save_exc).__name__, save_exc, ckpt_dir)
        raise

    progress.close()
    return transfer_result(student_module, {**last, "steps": completed[0], "wall_clock_s": totals()["wall_clock_s"]})


def transfer_result(student_module, metrics: dict[str, float]) -> TransferResult:
    """The student adapter's current embeddings (input rows, and the LM head when it is untied) as a
    `TransferResult` in float32 on the CPU."""
    output = student_module.output_embedding_weight()
    tied = output is None
    return TransferResult(
        input_embeddings=student_module.input_embedding_weight().float().cpu(),
        output_embeddings=None if tied else output.float().cpu(),
        tie_word_embeddings=tied,
        metrics=metrics,
    )

