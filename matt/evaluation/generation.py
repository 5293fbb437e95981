"""Generative proxy: greedy continuation of held-out text, scored with chrF.

Log-likelihood metrics can look fine while generation degrades (e.g. a broken LM head that still
ranks choices correctly). Continuing real held-out prompts greedily and comparing the result with
the true continuation via character n-gram F-score (chrF, tokenizer-independent) catches that.
Both the generated text and the reference are cut to the same number of characters so that
models with different tokenizers (and different characters per generated token) are compared on
equal lengths; leading whitespace is stripped from both because whether the first space of a
continuation shows up in decoded text is a tokenizer quirk (e.g. SentencePiece's "▁").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sacrebleu
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from matt.evaluation.bpb import as_text_list
from matt.evaluation.scoring import check_ids_fit_model, evaluation_mode, model_device, pad_batch, prefix_token_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationItem:
    """A held-out prompt (ending at a word end) and its true continuation."""

    prompt: str
    target: str


def build_generation_items(texts: Iterable[str], *, num_items: int, prompt_chars: int = 400, target_chars: int = 100,
                           seed: int = 0) -> list[GenerationItem]:
    """At most one item per document, deterministic given `seed`.

    The cut is placed at a whitespace character, so the prompt ends at the end of a word (ending a
    prompt mid-word or on a space would handicap tokenizers that merge across that point). The
    prompt is the preceding ~`prompt_chars` characters starting at a word start; the target is the
    following `target_chars` characters without leading whitespace. Documents without such a cut
    are skipped; fewer than `num_items` items are returned with a warning if documents run out.
    """
    if num_items < 1 or prompt_chars < 1 or target_chars < 1:
        raise ValueError(f"num_items, prompt_chars and target_chars must be >= 1; got {num_items}, "
                         f"{prompt_chars}, {target_chars}")
    rng = random.Random(seed)
    texts = as_text_list(texts)
    order = list(range(len(texts)))
    rng.shuffle(order)
    items: list[GenerationItem] = []
    skipped = 0
    for index in order:
        if len(items) == num_items:
            break
        item = _item_from_document(texts[index], prompt_chars, target_chars, rng)
        if item is None:
            skipped += 1
        else:
            items.append(item)
    if skipped:
        logger.info("Skipped %d document(s) too short for a %d+%d character item", skipped, prompt_chars, target_chars)
    if len(items) < num_items:
        logger.warning("Built only %d of %d requested generation items", len(items), num_items)
    return items


def _item_from_document(text: str, prompt_chars: int, target_chars: int, rng: random.Random) -> GenerationItem | None:
    cuts = [cut for cut in range(prompt_chars, len(text))
            if text[cut].isspace() and not text[cut - 1].isspace() and len(text[cut:].lstrip()) >= target_chars]
    if not cuts:
        return None
    cut = rng.choice(cuts)
    start = cut - prompt_chars
    if start > 0 and not text[start - 1].isspace():
        # Move forward to the next word start so the prompt does not begin mid-word.
        while start < cut and not text[start].isspace():
            start += 1
    prompt = text[start:cut].lstrip()
    if not prompt:
        return None
    return GenerationItem(prompt=prompt, target=text[cut:].lstrip()[:target_chars])


def greedy_continuations(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                         batch_size: int = 8, device: torch.device | str | None = None,
                         progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts`, as decoded text (stopping early at the tokenizer's EOS).

    Inputs are `[prefix token] + prompt tokens` (as in BPB), left-padded per batch. The decoding
    settings are set here, not taken from `model.generation_config`: an adapted model still
    carries its original tokenizer's EOS/pad ids there (meaningless under the new vocabulary), and
    a checkpoint's repetition penalty would make the result something other than greedy. The new
    text is what decoding prompt + new tokens adds after the decoded prompt, so a leading space
    that a decoder only shows mid-text is kept.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = as_text_list(prompts, "prompts")
    prefix_id = prefix_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_id
    device = model_device(model, device)
    encoded = [[prefix_id, *ids] for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    if encoded:
        check_ids_fit_model(model, max(max(ids) for ids in encoded))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        bos_token_id=prefix_id,
        # An empty list (not None, which would fall back to the model's own ids) = never stop early.
        eos_token_id=eos_id if eos_id is not None else [],
    )
    # Prompts of similar length decode together (less left padding); outputs go back in input order.
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]))
    outputs: list[str] = [""] * len(encoded)
    with evaluation_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = pad_batch([encoded[k] for k in rows], device, pad_id, left=True)
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for row, k in enumerate(rows):
                new_ids = generated[row, input_ids.shape[1]:].tolist()
                if eos_id is not None and eos_id in new_ids:
                    new_ids = new_ids[: new_ids.index(eos_id)]
                prompt_ids = encoded[k][1:]
                prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
                full_text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
                outputs[k] = (full_text[len(prompt_text):] if full_text.startswith(prompt_text)
                              else tokenizer.decode(new_ids, skip_special_tokens=True))
    return outputs


def generation_chrf(model: torch.nn.Module, tokenizer, items: Sequence[GenerationItem], max_new_tokens: int = 64, *,
                    batch_size: int = 8, device: torch.device | str | None = None,
                    progress: bool = True) -> dict[str, float]:
    """Corpus-level chrF (sacrebleu defaults, 0–100) of greedy continuations against the targets.

    Each hypothesis is stripped of leading whitespace and cut to its target's length in characters.
    `max_new_tokens` must be large enough to cover the target for the coarsest tokenizer compared;
    a too-short generation is simply penalised.
    """
    if not items:
        raise ValueError("No generation items to evaluate")
    continuations = greedy_continuations(model, tokenizer, [item.prompt for item in items],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         device=device, progress=progress)
    hypotheses = [text.lstrip()[: len(item.target)] for text, item in zip(continuations, items)]
    references = [item.target for item in items]
    return {"chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score), "n": len(items)}
