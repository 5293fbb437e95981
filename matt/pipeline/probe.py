"""Held-out diagnostics during a transfer (`probe.enabled=true`): budget curves, and why they flatten.

`TrainingProbe` is a trainer log function. The trainer leaves the time spent in log functions out
of its clock (`elapsed_s`, `max_wall_clock_s`), so the probe can evaluate without eating the
training budget. Logged to MLflow under stable keys:

every logged step (cheap; the rows that train, against their initial values):
- `diag/row_norm`: mean L2 norm of the trainable input rows / mean norm of the frozen (teacher)
  rows — how far from the teacher's scale the new rows sit;
- `diag/row_cos_init`: mean cosine of each trainable input row to its initial value;
- `diag/row_change`: mean ‖w − w₀‖ / ‖w₀‖ (relative movement, comparable across families: Gemma's
  rows have their own scale and are multiplied by √d inside the model);
- `diag/head_row_norm`, `diag/head_row_cos_init`, `diag/head_row_change`: the same for LM-head rows
  that train (untied head / `output_embeddings=ntp`);

at step 0, every `probe.every_s` seconds of training time (or `probe.every_n_steps` steps) and at
the end, on held-out text (`probe.split`, never the training split):
- `diag/train_s`: training seconds so far — the x axis of a budget curve;
- `diag/heldout_bpb` (+ `_new`, `_shared`: bytes under new vs shared student tokens): bits per
  byte of the full-depth model carrying the current rows, output side as the run has it;
- `diag/heldout_aim_mse`, `diag/heldout_aim_cosine`: full AIM at the AIM layer on the held-out
  segments — one yardstick for every method (AIM*, hidden, NTP and untrained inits included),
  each split into `_new` (pairs whose query or key segment holds a new student token) and
  `_shared` (both segments made only of shared tokens, though their context may hold new ones).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from matt.batches import AIMCollator, pad_id, prepare_dataset
from matt.evaluation.bpb import NewByteMasks, bits_per_byte
from matt.modeling.embeddings import EmbeddingLMHead
from matt.objectives import aim_loss, pair_mask, segment_last_positions
from matt.pipeline.evaluate import cap_texts
from matt.pipeline.config import dataset_cache_dir
from matt.trainer import transfer_result

logger = logging.getLogger(__name__)

HELDOUT_KEYS = ("train_s", "heldout_bpb", "heldout_bpb_new", "heldout_bpb_shared",
                *(f"heldout_aim_{loss}{part}" for loss in ("mse", "cosine") for part in ("", "_new", "_shared")))
"""The metric names the probe logs (under `diag/`); reports and tests rely on them."""


def row_movement(rows: torch.Tensor, initial: torch.Tensor, reference_norm: float) -> dict[str, float]:
    """`row_norm`, `row_cos_init`, `row_change` of `rows` (K, D) against `initial` (K, D) (see the
    module docstring); {} for K = 0."""
    if rows.shape[0] == 0:
        return {}
    rows, initial = rows.detach().float(), initial.detach().float().to(rows.device)
    norms, initial_norms = rows.norm(dim=-1), initial.norm(dim=-1)
    cosine = torch.nn.functional.cosine_similarity(rows, initial, dim=-1, eps=1e-12)
    change = (rows - initial).norm(dim=-1) / initial_norms.clamp_min(1e-12)
    return {"row_norm": float(norms.mean()) / max(reference_norm, 1e-12), "row_cos_init": float(cosine.mean()),
            "row_change": float(change.mean())}


def new_segments(student_ids: torch.Tensor, student_seg: torch.Tensor, is_new: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: segment k of row b holds at least one new student token (`is_new[id]`)."""
    n_segments = int(student_seg.max()) + 1
    member = student_seg.unsqueeze(-1) == torch.arange(n_segments, device=student_seg.device)  # (B, L, S)
    new_token = is_new.to(student_ids.device)[student_ids].unsqueeze(-1)  # (B, L, 1)
    return (member & new_token).any(dim=1)


@torch.no_grad()
def heldout_aim(teacher, student, batches: list[dict[str, torch.Tensor]], is_new: torch.Tensor,
                device: torch.device) -> dict[str, float]:
    """Full AIM (mse and cosine) of `student` against `teacher` over held-out `batches`, overall and
    split into pairs involving new tokens / shared tokens only; each a mean over all batches' pairs."""
    sums: defaultdict[str, float] = defaultdict(float)
    counts: defaultdict[str, int] = defaultdict(int)
    for batch in batches:
        t_seg, s_seg = batch["teacher_segment_ids"].to(device), batch["student_segment_ids"].to(device)
        s_ids = batch["student_input_ids"].to(device)
        t_out = teacher(batch["teacher_input_ids"].to(device), batch["teacher_attention_mask"].to(device))
        s_out = student(s_ids, batch["student_attention_mask"].to(device))
        new = new_segments(s_ids, s_seg, is_new)
        real = pair_mask(segment_last_positions(s_seg)[1])
        involves_new = new.unsqueeze(2) | new.unsqueeze(1)
        for part, pairs in (("", None), ("_new", involves_new), ("_shared", ~involves_new)):
            n = int((real if pairs is None else real & pairs).sum())
            if n == 0:
                continue
            for loss in ("mse", "cosine"):
                value = aim_loss(t_out.attn_probs, t_out.values, t_seg, s_out.attn_probs, s_out.values, s_seg,
                                 loss=loss, pairs=pairs)
                sums[f"heldout_aim_{loss}{part}"] += float(value) * n
                counts[f"heldout_aim_{loss}{part}"] += n
    return {key: sums[key] / counts[key] for key in sums}


class TrainingProbe:
    """A trainer log function measuring the student during training (see the module docstring).

    `teacher`, `student`: the AIM adapters being trained; `eval_model`: a full-depth model with the
    student's vocabulary that receives the current embeddings before each bits-per-byte measurement
    (None: no bits per byte); `batches`: held-out collated AIM batches; `texts`: held-out texts for
    bits per byte (`new_bytes`: their `NewByteMasks`); `log_fn(metrics, step)` receives the
    `diag/...` metrics.
    """

    def __init__(self, *, teacher, student, frozen_mask: torch.Tensor, log_fn: Callable[[dict, int], None],
                 batches: list[dict[str, torch.Tensor]], eval_model=None, tokenizer=None,
                 texts: list[str] | None = None, new_bytes=None, every_s: float | None = None,
                 every_n_steps: int | None = None, max_length: int = 1024, batch_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.teacher, self.student, self.log_fn = teacher, student, log_fn
        self.is_new = ~frozen_mask.bool()
        self.batches, self.eval_model, self.tokenizer, self.texts = batches, eval_model, tokenizer, texts
        self.new_bytes, self.every_s, self.every_n_steps = new_bytes, every_s, every_n_steps
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device)
        embeddings = student.input_embeddings
        self.initial_rows = embeddings.trainable.detach().float().cpu().clone()
        self.reference_norm = float(embeddings.frozen.float().norm(dim=-1).mean()) if embeddings.frozen.numel() else 1.0
        # the LM head trains with output_embeddings=ntp, and for untied models whenever NTP runs
        head_trains = student.output_mode == "ntp" or (not student.is_tied and student.with_ntp)
        self.initial_head = self.head_rows().float().cpu().clone() if head_trains else None
        self.rows: list[dict[str, float]] = []
        """Every held-out measurement: `{"step": s, "train_s": t, "heldout_bpb": ..., ...}`."""
        self._next_s = 0.0

    # --- cheap, every logged step ---------------------------------------------------------------
    def head_rows(self) -> torch.Tensor:
        """The LM-head rows of the new tokens, without building the (V, D) head matrix when the
        head is a partly frozen table (its trainable rows are the new tokens, in id order)."""
        head = self.student.causal_lm.get_output_embeddings()
        if isinstance(head, EmbeddingLMHead) and head.table.num_trainable == int(self.is_new.sum()):
            return head.table.trainable.detach()
        weight = self.student.output_embedding_weight()
        return weight[self.is_new.to(weight.device)]

    def row_metrics(self) -> dict[str, float]:
        metrics = row_movement(self.student.input_embeddings.trainable, self.initial_rows, self.reference_norm)
        if self.initial_head is not None:
            metrics.update({f"head_{k}": v for k, v in
                            row_movement(self.head_rows(), self.initial_head, self.reference_norm).items()})
        return metrics

    # --- held out -----------------------------------------------------------------------------
    def bits_per_byte(self) -> dict[str, float]:
        transfer_result(self.student, {}).apply_to(self.eval_model)
        result = bits_per_byte(self.eval_model, self.tokenizer, self.texts, max_length=self.max_length,
                               batch_size=self.batch_size, device=self.device, progress=False,
                               new_bytes=self.new_bytes)
        out = {"heldout_bpb": result.bpb}
        if result.bpb_new is not None:
            out.update(heldout_bpb_new=result.bpb_new, heldout_bpb_shared=result.bpb_shared)
        return out

    def measure(self, step: int, train_s: float) -> dict[str, float]:
        """Held-out measurement now (logged at `step`); appended to `rows` and returned."""
        started = time.perf_counter()
        was_training = self.student.training
        self.student.eval()
        row: dict[str, float] = {"step": step, "train_s": train_s, **self.row_metrics()}
        if self.batches:
            row.update(heldout_aim(self.teacher, self.student, self.batches, self.is_new, self.device))
        if self.eval_model is not None and self.texts:
            row.update(self.bits_per_byte())
        self.student.train(was_training)
        row["probe_s"] = time.perf_counter() - started
        self.rows.append(row)
        self.log_fn({f"diag/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}, step)
        logger.info("Probe at step %d (%.0f s of training): %s", step, train_s,
                    ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("heldout_")))
        return row

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        train_s = float(metrics.get("elapsed_s", 0.0))
        by_steps = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if by_steps or bool(self.every_s) and train_s >= self._next_s:
            self.measure(step, train_s)
            if self.every_s:
                while self._next_s <= train_s:
                    self._next_s += self.every_s
        else:
            self.log_fn({f"diag/{k}": v for k, v in self.row_metrics().items()}, step)

    def start(self) -> dict[str, float]:
        """The step-0 measurement (before training)."""
        row = self.measure(0, 0.0)
        if self.every_s:
            self._next_s = self.every_s
        return row

    def finish(self, steps: int, train_s: float) -> dict[str, float]:
        """The last measurement, unless the last logged step was already measured."""
        if self.rows and self.rows[-1]["step"] == steps:
            return self.rows[-1]
        return self.measure(steps, train_s)


def build_probe(cfg, *, documents, teacher, student, overlap, teacher_tokenizer, student_tokenizer, eval_model,
                log_fn, device) -> TrainingProbe:
    """The `probe` group's `TrainingProbe` for a transfer job: held-out texts from `probe.split`,
    their segmented AIM batches (cached like the training data) and, with `probe.bpb`, `eval_model`
    (a full-depth model with the student's vocabulary) for bits per byte; `overlap`: the run's
    `TokenOverlap` (new tokens = student tokens it does not share)."""

    pc = cfg.probe  # validated by `matt.pipeline.preflight.check_probe`
    texts = cap_texts([t[:pc.max_document_chars] for t in documents.split(pc.split)["text"] if t], pc.max_documents,
                      None)
    if not texts:
        raise ValueError(f"probe.split='{pc.split}' has no non-empty documents to measure on")
    batches = []
    if pc.aim_batches > 0:
        prepared = prepare_dataset(texts, teacher_tokenizer, student_tokenizer, max_length=cfg.data.max_length,
                                   num_proc=1, cache_dir=dataset_cache_dir(cfg), text_column="text").dataset
        loader = DataLoader(prepared, batch_size=cfg.train.batch_size,
                            collate_fn=AIMCollator(pad_id(teacher_tokenizer), pad_id(student_tokenizer)))
        batches = list(itertools.islice(loader, pc.aim_batches))
    new_bytes = None
    if pc.bpb:
        try:
            new_bytes = NewByteMasks.from_tokenizers(teacher_tokenizer, student_tokenizer, texts, overlap=overlap)
        except ValueError as exc:
            logger.warning("probe: no heldout_bpb_new / _shared (%s)", exc)
    logger.info("Probe: %d held-out documents of %r, %d AIM batches, bits per byte %s, every %s", len(texts),
                pc.split, len(batches), "on" if pc.bpb else "off",
                f"{pc.every_s:g} s" if pc.every_s else f"{pc.every_n_steps} steps" if pc.every_n_steps else "-")
    return TrainingProbe(teacher=teacher, student=student, frozen_mask=overlap.frozen_mask(), log_fn=log_fn,
                         batches=batches, eval_model=eval_model if pc.bpb else None, tokenizer=student_tokenizer,
                         texts=texts, new_bytes=new_bytes, every_s=pc.every_s, every_n_steps=pc.every_n_steps,
                         max_length=cfg.eval.max_length, batch_size=cfg.eval.batch_size, device=device)


def write_probe_rows(rows: list[dict[str, float]], path) -> None:
    """The held-out measurements as JSON lines (one per measurement)."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
