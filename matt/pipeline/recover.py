"""`experiment=recover_known`: a known-answer test of the whole training pipeline.

The student tokenizer *is* the teacher's, so the right embedding of every token is known. K frequent
teacher tokens (frequency ranks `recover.rank_start` .. `recover.rank_end` - 1 on the train split,
special tokens excluded) have their rows overwritten by the `init` method (`mean`: the mean teacher
row; `random`: N(mean, std) draws); every other row stays frozen; the objective (AIM, AIM*, hidden,
NTP, ...) then trains the deleted rows back, with the same loop, truncation and data as a transfer.

`recover.rows` says which rows are deleted:
- `input`: the input rows only; the LM head keeps the true rows (the model is untied for this):
  isolates what the objective can do for the input side;
- `input_output`: the input rows and, as in a real transfer, the output rows too. For tied models the
  output side follows `objective.output_embeddings` (`tied`: the trained rows are the LM head;
  `keep_init`: the head keeps the deleted rows; `ntp`: the head rows are trained by the NTP term);
  untied models get their head rows deleted too (trained only with NTP).

Measured over training (every logged step for the cheap numbers, every `recover.eval_every` steps
and at the end for bits per byte), logged to MLflow under `recover/...` and written to
`<output_dir>/recover/results.{json,md}`:
- `recover/bpb`: bits per byte on the evaluated split (each document cut to `recover.eval_max_chars`
  characters, scored as in `matt.evaluation.bpb` with `eval.max_length`), next to `recover/bpb_untouched`
  (the teacher) and `recover/bpb_deleted` (step 0);
- `recover/recovered` = (deleted − bpb) / (deleted − untouched): 1 = all of the damage repaired;
- `recover/cosine_input`, `recover/cosine_output`: mean cosine of the deleted rows to the true rows
  (a diagnostic: functionally equivalent rows need not be close); `recover/distance_input`,
  `recover/distance_output`: mean Euclidean distance to the true rows; `recover/change_input`: mean
  distance travelled from the deleted state.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matt.api import MATT
from matt.digests import cache_key, texts_digest
from matt.evaluation.bpb import bits_per_byte
from matt.initialization import embeddings_tied
from matt.modeling import adapter_for
from matt.pipeline.evaluate import eval_device
from matt.pipeline.models import load_teacher_model, model_identity
from matt.pipeline.run_context import JsonlLog, log_job_config, method_label, open_job_tracker, start_job
from matt.segmentation import special_token_ids

logger = logging.getLogger(__name__)

RECOVER_INITS = ("mean", "random")
RECOVER_DIR = "recover"


# ------------------------------------------------------------------------------------------------
# which rows, and deleting them
# ------------------------------------------------------------------------------------------------
def frequent_token_ids(tokenizer, texts: list[str], rank_start: int, rank_end: int) -> list[int]:
    """Teacher ids at frequency ranks [rank_start, rank_end) of `texts` (0 = most frequent; ties by
    id; special tokens excluded)."""
    if not 0 <= rank_start < rank_end:
        raise ValueError(f"recover.rank_start={rank_start} / recover.rank_end={rank_end}: need 0 <= start < end")
    counts = Counter(itertools.chain.from_iterable(tokenizer(texts, add_special_tokens=False)["input_ids"]))
    specials = special_token_ids(tokenizer)
    ranked = sorted((t for t in counts if t not in specials), key=lambda t: (-counts[t], t))
    if len(ranked) < rank_end:
        raise ValueError(f"recover.rank_end={rank_end}: the train split has only {len(ranked)} distinct teacher "
                         "tokens; lower recover.rank_end")
    return ranked[rank_start:rank_end]


def untie_output_embeddings(model) -> None:
    """Give a tied HF model its own LM-head matrix (a copy of the current one)."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False  # the same object unless multimodal


def check_recover_init(method: str) -> None:
    if method not in RECOVER_INITS:
        raise ValueError(f"init.method={method!r} cannot delete rows for recover_known: choose one of "
                         f"{list(RECOVER_INITS)} (the student tokenizer is the teacher's, so every other method "
                         "would copy the true rows back)")


@dataclass
class DeletedRows:
    """The K deleted token ids, their true rows and their deleted input rows (float32, (K, D))."""

    ids: torch.Tensor
    true_input: torch.Tensor
    true_output: torch.Tensor
    deleted_input: torch.Tensor


def replacement_rows(weight: torch.Tensor, num_real: int, k: int, method: str, generator: torch.Generator):
    """(k, D) rows from the statistics of the real rows of `weight`: their mean, or N(mean, std) draws."""
    real = weight[:num_real].detach().double()
    mean, std = real.mean(0), real.std(0)
    if method == "mean":
        return mean.float().expand(k, -1).clone()
    return torch.normal(mean.expand(k, -1), std.expand(k, -1), generator=generator).float()


def delete_rows(model, ids: list[int], *, method: str, rows: str, num_real: int, seed: int = 0) -> DeletedRows:
    """Overwrite the rows of `ids` in place (see the module docstring for `rows`); returns both states."""
    check_recover_init(method)
    if rows not in ("input", "input_output"):
        raise ValueError(f"recover.rows={rows!r} is invalid: choose one of ['input', 'input_output']")
    index = torch.tensor(ids, dtype=torch.long)
    if rows == "input" and embeddings_tied(model):
        untie_output_embeddings(model)  # the LM head keeps the true rows
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings().weight  # the same tensor when tied
    true_input = inputs.detach()[index].float().clone()
    true_output = outputs.detach()[index].float().clone()
    generator = torch.Generator().manual_seed(seed)
    new_input = replacement_rows(inputs, num_real, len(ids), method, generator)
    with torch.no_grad():
        inputs[index] = new_input.to(inputs.dtype)
        if rows == "input_output" and outputs is not inputs:
            outputs[index] = replacement_rows(outputs, num_real, len(ids), method, generator).to(outputs.dtype)
    return DeletedRows(ids=index, true_input=true_input, true_output=true_output,
                       deleted_input=inputs.detach()[index].float().clone())


def mean_cosine(rows: torch.Tensor, true: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(rows.double(), true.double(), dim=1).mean())


def mean_distance(rows: torch.Tensor, true: torch.Tensor) -> float:
    return float((rows.double() - true.double()).norm(dim=1).mean())


# ------------------------------------------------------------------------------------------------
# measuring recovery during training
# ------------------------------------------------------------------------------------------------
def evaluation_texts(cfg, documents) -> list[str]:
    """The evaluated split, first `eval.max_documents` non-empty documents, each cut to `recover.eval_max_chars`."""
    split = documents.split(cfg.eval.split)["text"]
    texts = [t[:cfg.recover.eval_max_chars] for t in split if t and t.strip()][:cfg.eval.max_documents]  # None: all
    if not texts:
        raise ValueError(f"recover_known: the {cfg.eval.split} split has no non-empty documents to evaluate")
    return texts


class RecoveryProbe:
    """A trainer log function that measures the deleted rows (every logged step) and bits per byte of
    the full model carrying them (step 0, every `eval_every` steps, and the last step).

    `score()`: bits per byte of `eval_model` as it is; `bpb_deleted` (the step-0 value) is set before
    the first measurement."""

    def __init__(self, student, eval_model, deleted: DeletedRows, score, *, eval_every: int, max_steps: int, log_fn,
                 bpb_untouched: float):
        self.student, self.eval_model, self.deleted, self.score = student, eval_model, deleted, score
        self.eval_every, self.max_steps, self.log_fn = eval_every, max_steps, log_fn
        self.bpb_untouched = bpb_untouched
        self.bpb_deleted: float | None = None
        self.rows: list[dict[str, float]] = []

    def current_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input rows, output rows) of the deleted ids as the student has them now."""
        ids = self.deleted.ids
        inputs = self.student.input_embedding_weight().float().cpu()[ids]
        output = self.student.output_embedding_weight()
        outputs = inputs if output is None else output.float().cpu()[ids]
        return inputs, outputs

    def bits_per_byte(self) -> float:
        """Bits per byte of `eval_model` carrying the student's current rows."""
        inputs, outputs = self.current_rows()
        ids = self.deleted.ids
        with torch.no_grad():
            weight = self.eval_model.get_input_embeddings().weight
            weight[ids] = inputs.to(weight.device, weight.dtype)
            head = self.eval_model.get_output_embeddings().weight
            head[ids] = outputs.to(head.device, head.dtype)
        return self.score()

    def measure(self, step: int, metrics: dict[str, float] | None = None, *, with_bpb: bool) -> dict[str, float]:
        """Measure the deleted rows now (and bits per byte if `with_bpb`; step 0 is `bpb_deleted`),
        log under `recover/...` at `step`."""
        inputs, outputs = self.current_rows()
        d = self.deleted
        row: dict[str, float] = {
            "step": step,
            "cosine_input": mean_cosine(inputs, d.true_input), "cosine_output": mean_cosine(outputs, d.true_output),
            "distance_input": mean_distance(inputs, d.true_input),
            "distance_output": mean_distance(outputs, d.true_output),
            "change_input": mean_distance(inputs, d.deleted_input),
        }
        if metrics:
            row.update({k: float(metrics[k]) for k in ("aim_loss", "ntp_loss", "loss") if k in metrics})
        if with_bpb:
            started = time.perf_counter()
            bpb = self.bpb_deleted if step == 0 else self.bits_per_byte()
            gap = self.bpb_deleted - self.bpb_untouched
            row.update(bpb=bpb, recovered=(self.bpb_deleted - bpb) / gap if gap else math.nan,
                       bpb_eval_s=time.perf_counter() - started)
        self.rows.append(row)
        self.log_fn({f"recover/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}, step)
        return row

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        with_bpb = step % self.eval_every == 0 or step >= self.max_steps
        self.measure(step, metrics, with_bpb=with_bpb)


def results_table(rows: list[dict[str, float]], bpb_untouched: float, bpb_deleted: float) -> str:
    """Markdown table of the probe rows that have bits per byte."""
    lines = [f"untouched model: {bpb_untouched:.4f} bits/byte; deleted rows: {bpb_deleted:.4f}", "",
             "| step | bits/byte | recovered | cosine in | cosine out | distance in | AIM/objective loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "bpb" not in row:
            continue
        loss = row.get("aim_loss")
        lines.append(f"| {int(row['step'])} | {row['bpb']:.4f} | {100 * row['recovered']:.1f} % | "
                     f"{row['cosine_input']:.3f} | {row['cosine_output']:.3f} | {row['distance_input']:.3f} | "
                     f"{'' if loss is None else f'{loss:.4g}'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
def _cached_bpb(cache_dir: Path, key: dict[str, Any], compute) -> float:
    """Bits per byte memoised on disk (the untouched model is the same for every run of a sweep)."""
    path = cache_dir / "recover" / f"bpb-{cache_key(key)}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["bpb"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bpb": value, "key": key}, default=str))
    return value


def run_recover(cfg) -> float | None:
    """Run one known-answer job; returns the final fraction of the bits-per-byte damage recovered."""
    started = time.perf_counter()
    rc = cfg.recover
    method = str(cfg.init.method)
    rows_mode = str(rc.rows)
    check_recover_init(method)
    if rc.eval_every < 1 or rc.eval_every % cfg.train.log_every_n_steps:
        raise ValueError(f"recover.eval_every={rc.eval_every} must be a positive multiple of "
                         f"train.log_every_n_steps={cfg.train.log_every_n_steps} (bits per byte is measured at "
                         "logged steps)")
    job = start_job(cfg)
    if job is None:  # dry run
        return None
    output_dir, _, plan, accelerator, mcfg = job
    if accelerator.num_processes > 1:
        raise ValueError("recover_known runs in a single process (its probe evaluates during training)")
    n_layers, with_ntp = plan.n_layers, plan.with_ntp
    tokenizer, documents = plan.teacher_tokenizer, plan.documents
    cache_dir = Path(cfg.paths.cache_dir)
    label = cfg.label or (f"{method_label(cfg, n_layers, with_ntp, tied=False)} rows={rows_mode} "
                          f"lr={cfg.train.lr:g}")
    tracker = open_job_tracker(cfg, job, kind="recover_known", label=label, recover_rows=rows_mode,
                               output_embeddings=str(cfg.objective.output_embeddings))

    with tracker.run():
        log_job_config(tracker, cfg, output_dir, n_layers=n_layers, with_ntp=with_ntp)

        # 1. the rows to delete: frequency ranks on the train split (never the evaluated split)
        train_texts = [t for t in documents.train["text"] if t]
        ids = frequent_token_ids(tokenizer, train_texts, rc.rank_start, rc.rank_end)

        # 2. data: the teacher's tokenizer on both sides
        matt = MATT(config=mcfg, teacher_tokenizer=tokenizer, student_tokenizer=tokenizer)
        matt.prepare_dataset(documents.train, text_column="text")

        # 3. teacher, student with deleted rows, and an untied full-depth copy for evaluation
        teacher_model = load_teacher_model(cfg.model, tokenizer)
        student_model = copy.deepcopy(teacher_model)
        deleted = delete_rows(student_model, ids, method=method, rows=rows_mode, num_real=len(tokenizer),
                              seed=cfg.init.seed)
        eval_model = copy.deepcopy(teacher_model)
        if embeddings_tied(eval_model):
            untie_output_embeddings(eval_model)
        texts = evaluation_texts(cfg, documents)
        device = eval_device(cfg.eval)
        eval_model.to(device)

        def score() -> float:
            return bits_per_byte(eval_model, tokenizer, texts, max_length=cfg.eval.max_length,
                                 batch_size=cfg.eval.batch_size, device=device, progress=False).bpb

        identity = {"model": model_identity(cfg.model), "texts": texts_digest(texts),
                    "max_length": cfg.eval.max_length}
        bpb_untouched = _cached_bpb(cache_dir, {**identity, "state": "untouched"}, score)
        tracker.log_metrics({"recover/num_rows": len(ids), "recover/bpb_untouched": bpb_untouched,
                             "recover/eval_documents": len(texts)})

        # 4. adapters: only the deleted rows train
        all_rows = torch.ones(teacher_model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
        frozen = all_rows.clone()
        frozen[deleted.ids] = False
        adapter = adapter_for(teacher_model)
        teacher = adapter(teacher_model, n_layers=n_layers, frozen_embeddings_mask=all_rows)
        student = adapter(student_model, n_layers=n_layers, frozen_embeddings_mask=frozen, with_ntp=with_ntp)
        if rows_mode == "input" and not student.is_tied:
            student.causal_lm.get_output_embeddings().requires_grad_(False)  # the true head rows stay
        logger.info("recover_known: %d rows (ranks %d-%d) deleted to %s, rows=%s; training %s at n_layers=%d",
                    len(ids), rc.rank_start, rc.rank_end - 1, method, rows_mode, cfg.objective.name, n_layers)

        probe = RecoveryProbe(student, eval_model, deleted, score, eval_every=rc.eval_every,
                              max_steps=cfg.train.max_steps, log_fn=tracker.log_metrics, bpb_untouched=bpb_untouched)
        deleted_key = {**identity, "state": "deleted", "ids": ids, "method": method, "rows": rows_mode,
                       "seed": cfg.init.seed}
        probe.bpb_deleted = _cached_bpb(cache_dir, deleted_key, probe.bits_per_byte)
        probe.measure(0, with_bpb=True)
        tracker.log_metrics({"recover/bpb_deleted": probe.bpb_deleted})

        # 5. training, measured as it goes
        train_log = JsonlLog(output_dir / "train_log.jsonl")
        result = matt.train(teacher, student, log_fns=[tracker.training_logger(), train_log, probe],
                            accelerator=accelerator)
        if probe.rows[-1]["step"] != result.metrics["steps"] or "bpb" not in probe.rows[-1]:
            probe.measure(int(result.metrics["steps"]), with_bpb=True)  # a budget stop between logged steps
        final = probe.rows[-1]
        summary = {"bpb_untouched": bpb_untouched, "bpb_deleted": probe.bpb_deleted, "num_rows": len(ids),
                   **{f"final_{k}": v for k, v in final.items() if k != "step"},
                   # the trainer's clock leaves out the probe's evaluations (they run in a log function)
                   "steps": result.metrics["steps"], "train_wall_clock_s": result.metrics["wall_clock_s"]}
        tracker.log_metrics({f"recover/{k}": v for k, v in summary.items() if math.isfinite(v)},
                            step=int(result.metrics["steps"]))
        directory = output_dir / RECOVER_DIR
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps({"label": label, "summary": summary, "rows": probe.rows,
                                                            "token_ids": ids}, indent=2))
        table = results_table(probe.rows, bpb_untouched, probe.bpb_deleted)
        (directory / "results.md").write_text(f"# {cfg.name} · {label}\n\n{table}\n")
        tracker.log_artifacts(directory, "recover")
        tracker.log_metrics({"job/wall_clock_s": time.perf_counter() - started})
        print(f"\n{cfg.name} · {label}\n{table}\n", flush=True)
    return float(final["recovered"])
