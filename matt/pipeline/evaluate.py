"""The `eval` group: one fixed evaluation suite applied to several models, and the results table.

An `EvalSuite` is built once per job from the held-out split (capped by documents and bytes, since
CPU evaluation of a 135M model is slow): the texts, the multiple-choice and the generation items.
Every model - the original with its own tokenizer, the initialised student, the trained student -
is then scored on exactly the same text and items, so the numbers are comparable across
tokenizers. Metrics (names without the model prefix):

  bpb, bpb_tokens        bits per UTF-8 byte of the held-out text (and the tokens it took)
  bpb_ci_low, bpb_ci_high  its 95 % interval, resampling whole documents (`ratio_bootstrap`)
  bpb_new, bpb_shared    bits per byte on the bytes covered by new / shared student tokens, and
  new_byte_fraction      their share (when the suite knows the teacher and student tokenizers)
  bytes_per_token, tokens_per_word, chars_per_token    compression of the tokenizer
  unigram_bpb            the tokenizer's context-free unigram floor (fit on the train split)
  choice_accuracy        next-sentence multiple choice (by log-likelihood per byte), with
  choice_accuracy_ci_low, choice_accuracy_ci_high    its 95 % Wilson interval
  choice_accuracy_pmi    the same items ranked by how much the context raises each choice's
                         likelihood (+ `_ci_low` / `_ci_high`)
  chrf                   greedy continuation vs the true one (chrF)
  lm_eval/<task>/<metric>  lm-evaluation-harness tasks (optional `eval` extra)
  eval_seconds           wall-clock of this model's evaluation

Besides these numbers a model's results hold per-unit lists (`matt.report.UNIT_KEYS`: the
multiple-choice credit of every item, the bits and bytes of every evaluated document), which go to
`results.json` but not to MLflow metrics; `results_table` uses them for paired comparisons.

A model's results can be cached on disk (`<paths.cache_dir>/eval/`) under a key of the model's
identity and the suite; sweeps then evaluate the original model and a shared initialisation once.
Metrics that cannot be computed on the given text (e.g. no document with two sentences for
multiple choice) are skipped with a logged reason, listed in `EvalSuite.skipped`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from matt import digests
from matt.config import resolve_mixed_precision
from matt.evaluation.bpb import NewByteMasks, bits_per_byte
from matt.evaluation.choice import build_choice_items, chance_accuracy, multiple_choice_accuracy
from matt.evaluation.compression import compression
from matt.evaluation.generation import build_generation_items, generation_chrf
from matt.evaluation.intervals import ratio_bootstrap
from matt.evaluation.unigram import UnigramModel
from matt.report import (CI_SUFFIXES, DOCUMENT_KEYS, ITEM_KEYS, UNIT_KEYS, format_difference, metric_direction,
                         markdown_table, paired_difference, percent_of_baseline, recovery)

logger = logging.getLogger(__name__)


def cap_texts(texts: list[str], max_documents: int | None, max_bytes: int | None,
              max_document_bytes: int | None = None) -> list[str]:
    """Non-empty documents in order until `max_documents` / `max_bytes` (UTF-8); the document that
    crosses the byte budget is cut to fit (at a character boundary). With `max_document_bytes` each
    document is first cut to its head (at the last line break within the limit, if there is one)."""
    capped: list[str] = []
    used = 0
    for text in texts:
        if max_document_bytes is not None and len(text.encode("utf-8")) > max_document_bytes:
            head = text.encode("utf-8")[:max_document_bytes].decode("utf-8", errors="ignore")
            text = head[: head.rfind("\n")] if "\n" in head else head
        if not text:
            continue
        if max_documents is not None and len(capped) >= max_documents:
            break
        size = len(text.encode("utf-8"))
        if max_bytes is not None and used + size > max_bytes:
            room = max_bytes - used
            cut = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            if cut.strip():
                capped.append(cut)
            break
        capped.append(text)
        used += size
    return capped


def eval_device(eval_cfg) -> torch.device:
    if eval_cfg.device:
        return torch.device(eval_cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_autocast(precision, device: torch.device):
    """The autocast context of `eval.precision` on `device` (none for float32)."""
    mode = resolve_mixed_precision(precision, cpu=device.type != "cuda")
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


@dataclass
class EvalSuite:
    """The held-out texts and items every model of a job is evaluated on."""

    cfg: Any
    texts: list[str]
    train_texts: list[str]
    choice_items: list = field(default_factory=list)
    generation_items: list = field(default_factory=list)
    new_bytes: Any = None
    """`NewByteMasks` of `texts` (bytes covered by new student tokens) when the teacher and student
    tokenizers were given to `build`; then every model also gets `bpb_new` / `bpb_shared`."""
    skipped: dict[str, str] = field(default_factory=dict)
    empty_documents: int = 0
    """Empty or null documents of the evaluated split (not evaluated; counted, as training does)."""

    @classmethod
    def build(cls, eval_cfg, documents, *, teacher_tokenizer=None, student_tokenizer=None,
              overlap=None) -> "EvalSuite":
        split_texts = list(documents.split(eval_cfg.split)["text"])
        present = [t for t in split_texts if t]  # also the choice items' source (eval.choice.whole_split)
        empty = len(split_texts) - len(present)
        if empty:
            logger.warning("eval.split='%s': %d of %d documents are empty or null and are not evaluated",
                           eval_cfg.split, empty, len(split_texts))
        texts = cap_texts(present, eval_cfg.max_documents, eval_cfg.max_bytes, eval_cfg.max_document_bytes)
        if not texts:
            raise ValueError(f"eval.split='{eval_cfg.split}' has no non-empty documents to evaluate on")
        train_texts = [t for t in documents.train["text"] if t]
        if eval_cfg.unigram_max_train_documents is not None:
            train_texts = train_texts[: eval_cfg.unigram_max_train_documents]
        suite = cls(cfg=eval_cfg, texts=texts, train_texts=train_texts, empty_documents=empty)
        if eval_cfg.bpb and teacher_tokenizer is not None and student_tokenizer is not None:
            try:
                suite.new_bytes = NewByteMasks.from_tokenizers(teacher_tokenizer, student_tokenizer, texts,
                                                               overlap=overlap)
            except ValueError as exc:
                suite.skipped["bpb_new"] = str(exc)
        if eval_cfg.choice.enabled:
            choice_texts = present if eval_cfg.choice.whole_split else texts
            try:
                suite.choice_items = build_choice_items(
                    choice_texts, num_items=eval_cfg.choice.num_items, num_choices=eval_cfg.choice.num_choices,
                    seed=eval_cfg.choice.seed, context_sentences=eval_cfg.choice.context_sentences)
            except ValueError as exc:
                suite.skipped["choice_accuracy"] = str(exc)
            if not suite.choice_items and "choice_accuracy" not in suite.skipped:
                suite.skipped["choice_accuracy"] = "no document of the evaluated text has two usable sentences"
        if eval_cfg.generation.enabled:
            suite.generation_items = build_generation_items(
                texts, num_items=eval_cfg.generation.num_items, prompt_chars=eval_cfg.generation.prompt_chars,
                target_chars=eval_cfg.generation.target_chars, seed=eval_cfg.generation.seed)
            if not suite.generation_items:
                suite.skipped["chrf"] = "no evaluated document is long enough for a prompt + target"
        for metric, reason in suite.skipped.items():
            logger.warning("Evaluation of %s skipped: %s", metric, reason)
        return suite

    def describe(self) -> dict[str, float]:
        """What the suite holds (logged once per job as `eval/...`)."""
        info = {
            "eval/num_documents": float(len(self.texts)),
            "eval/num_bytes": float(sum(len(t.encode("utf-8")) for t in self.texts)),
            "eval/choice_items": float(len(self.choice_items)),
            "eval/generation_items": float(len(self.generation_items)),
            "eval/skipped_metrics": float(len(self.skipped)),
            "eval/empty_documents": float(self.empty_documents),
        }
        if self.choice_items:
            info["eval/choice_chance"] = chance_accuracy(self.choice_items)
        if self.new_bytes is not None:
            info["eval/new_byte_fraction"] = self.new_bytes.new_byte_fraction
        return info

    def fingerprint(self) -> str:
        options = {k: v for k, v in OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True).items()
                   if k not in ("progress", "device", "original", "init", "final", "enabled")}
        new_bytes = None if self.new_bytes is None else [mask.nonzero()[0].tolist() for mask in self.new_bytes.masks]
        return digests.cache_key({"options": options, "texts": self.texts, "train": len(self.train_texts),
                                  "train_head": self.train_texts[:50], "choice": [repr(i) for i in self.choice_items],
                                  "generation": [repr(i) for i in self.generation_items], "new_bytes": new_bytes})

    # --------------------------------------------------------------------------------------------
    def run(self, model, tokenizer, *, name: str = "model", cache_dir: str | Path | None = None,
            cache_key: Any = None) -> dict[str, float]:
        """All enabled metrics of `model` with `tokenizer` (see the module docstring)."""
        cache_file = None
        if cache_dir is not None and cache_key is not None:
            key = digests.cache_key({"model": cache_key, "suite": self.fingerprint()})
            cache_file = Path(cache_dir) / "eval" / f"{key}.json"
            if cache_file.is_file():
                logger.info("Evaluation of %s from cache %s", name, cache_file)
                return json.loads(cache_file.read_text())

        cfg = self.cfg
        device = eval_device(cfg)
        model.to(device)
        started = time.perf_counter()
        results: dict[str, float] = {}
        logger.info("Evaluating %s on %d documents (%s)", name, len(self.texts), device)
        with eval_autocast(cfg.precision, device):
            if cfg.bpb:
                bpb = bits_per_byte(model, tokenizer, self.texts, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                    device=device, progress=cfg.progress, new_bytes=self.new_bytes)
                results["bpb"], results["bpb_tokens"] = bpb.bpb, float(bpb.tokens)
                interval = ratio_bootstrap(bpb.document_bits, bpb.document_bytes)
                results["bpb_ci_low"], results["bpb_ci_high"] = interval.low, interval.high
                bits_key, bytes_key = DOCUMENT_KEYS["bpb"]
                results[bits_key], results[bytes_key] = list(bpb.document_bits), list(bpb.document_bytes)
                if self.new_bytes is not None:
                    results.update(bpb_new=bpb.bpb_new, bpb_shared=bpb.bpb_shared,
                                   new_byte_fraction=bpb.new_byte_fraction)
            if cfg.compression:
                results.update(compression(tokenizer, self.texts))
            if cfg.unigram:
                results["unigram_bpb"] = UnigramModel.fit(tokenizer, self.train_texts).bits_per_byte(self.texts).bpb
            if self.choice_items:
                choice = multiple_choice_accuracy(
                    model, tokenizer, self.choice_items, max_length=cfg.max_length, batch_size=cfg.choice.batch_size,
                    device=device, progress=cfg.progress, pmi=cfg.choice.pmi)
                for suffix in ("", "_pmi") if cfg.choice.pmi else ("",):
                    metric = f"choice_accuracy{suffix}"
                    for bound in ("", *CI_SUFFIXES):
                        results[f"{metric}{bound}"] = choice[f"accuracy{suffix}{bound}"]
                    results[ITEM_KEYS[metric]] = choice[f"credits{suffix}"]
            if self.generation_items:
                results["chrf"] = float(generation_chrf(
                    model, tokenizer, self.generation_items, max_new_tokens=cfg.generation.max_new_tokens,
                    batch_size=cfg.generation.batch_size, device=device, progress=cfg.progress)["chrf"])
            if cfg.lm_eval.enabled:
                results.update(run_lm_eval(cfg.lm_eval, model, tokenizer, device))
        results["eval_seconds"] = time.perf_counter() - started
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(results, indent=2))
        return results


def run_lm_eval(lm_cfg, model, tokenizer, device) -> dict[str, float]:
    """lm-evaluation-harness tasks through `matt.evaluation.lm_eval_bridge` (the `eval` extra)."""
    if not lm_cfg.tasks:
        raise ValueError("eval.lm_eval.enabled=true needs eval.lm_eval.tasks=[...]")
    from matt.evaluation.lm_eval_bridge import run_lm_eval as bridge
    scores = bridge(model, tokenizer, list(lm_cfg.tasks), include_path=lm_cfg.include_path,
                    num_fewshot=lm_cfg.num_fewshot, limit=lm_cfg.limit, batch_size=lm_cfg.batch_size,
                    device=str(device))
    return {f"lm_eval/{key}": float(value) for key, value in scores.items()}


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
def prefixed(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{"final": {"bpb": 1.6}}` -> `{"final/bpb": 1.6}` (MLflow metric names); per-item lists
    (`ITEM_KEYS`) are left out (they live in `results.json`)."""
    return {f"{prefix}/{name}": value for prefix, metrics in results.items() for name, value in metrics.items()
            if not isinstance(value, (list, tuple))}


def results_table(results: dict[str, dict[str, Any]], baseline: str = "original", reference: str = "init") -> str:
    """A markdown table: one row per metric, one column per model. Accuracies carry their 95 %
    interval. For the last model also `% of <baseline>` (direction-aware: for bits per byte,
    100 * baseline / value), `recovery %` = 100 (x − reference) / (baseline − reference) for every
    metric with a direction (0 = the initialisation, 100 = the original model; `matt.report.recovery`)
    and, for accuracies and bits per byte, the paired difference to `reference` on the same items /
    documents with its 95 % bootstrap interval, marked `*` when the interval excludes 0
    (`matt.report.paired_difference`)."""
    models = list(results)
    names = [name for name in dict.fromkeys(name for metrics in results.values() for name in metrics)
             if name not in UNIT_KEYS and not name.endswith(CI_SUFFIXES)]
    last = models[-1] if models else None
    show_percent = baseline in results and last is not None and last != baseline
    show_recovery = show_percent and reference in results and last != reference
    paired = {} if last == reference or reference not in results else {
        name: diff for name in [*ITEM_KEYS, *DOCUMENT_KEYS]
        if (diff := paired_difference(name, results[last], results[reference])) is not None}
    header = ["metric", *models]
    header += [f"{last} % of {baseline}"] if show_percent else []
    header += [f"{last} recovery % ({reference} → {baseline})"] if show_recovery else []
    header += [f"{last} − {reference} [95% CI, paired]"] if paired else []
    rows = []
    for name in names:
        row = [name] + [_fmt_with_interval(results[m], name) for m in models]
        if show_percent:
            percent = percent_of_baseline(name, results[last].get(name), results[baseline].get(name))
            row.append("–" if percent is None else f"{percent:.1f}")
        if show_recovery:
            value = (recovery(results[last].get(name), results[baseline].get(name), results[reference].get(name))
                     if metric_direction(name) is not None else None)
            row.append("–" if value is None else f"{100 * value:.1f}")
        if paired:
            row.append(format_difference(paired[name]) if name in paired else "–")
        rows.append(row)
    return markdown_table(header, rows)


def _fmt_with_interval(metrics: dict[str, Any], name: str) -> str:
    value = _fmt(metrics.get(name))
    low, high = (metrics.get(f"{name}{suffix}") for suffix in CI_SUFFIXES)
    return value if low is None or high is None else f"{value} [{low:.4f}, {high:.4f}]"


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and (abs(value) >= 1000 or (value.is_integer() and abs(value) >= 10)):
        return f"{value:.0f}"  # counts (tokens) and long durations
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_results(results: dict[str, dict[str, Any]], directory: str | Path,
                  extra: dict | None = None) -> tuple[Path, Path]:
    """`results.json` (every number and per-item list) and `results.md` (the table) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "results.json"
    json_path.write_text(json.dumps({"models": results, **(extra or {})}, indent=2))
    table_path = directory / "results.md"
    table_path.write_text(results_table(results) + "\n")
    return json_path, table_path
