"""Evaluation of a tokenizer transfer: metrics comparable across tokenizers.

- `bits_per_byte` (+ `BPBResult`): held-out next-token loss per UTF-8 byte, for the original
  model with its tokenizer and the adapted model with the new one alike; with `NewByteMasks`
  also split into bytes of new vs shared student tokens.
- `compression`: bytes per token, tokens per word, characters per token.
- `UnigramModel`: the context-free "tokenizer floor" in bits per byte.
- `build_choice_items` / `multiple_choice_accuracy`: true next sentence among distractors, with
  95 % Wilson intervals; `paired_bootstrap` compares two models on the same items.
- `token_nll` / `score_continuations`: the scoring primitives (logits only at scored positions,
  one forward per shared context).
- `build_generation_items` / `generation_chrf`: greedy continuation scored with chrF.
- `run_lm_eval`: lm-evaluation-harness tasks (optional `eval` extra, imported when called).
"""

from matt.evaluation.bpb import BPBResult, NewByteMasks, bits_per_byte
from matt.evaluation.choice import ChoiceItem, build_choice_items, chance_accuracy, multiple_choice_accuracy
from matt.evaluation.compression import compression
from matt.evaluation.generation import GenerationItem, build_generation_items, generation_chrf, greedy_continuations
from matt.evaluation.intervals import paired_bootstrap, wilson_interval
from matt.evaluation.lm_eval_bridge import run_lm_eval
from matt.evaluation.scoring import score_continuations, score_sequences, token_nll
from matt.evaluation.unigram import UnigramModel

__all__ = [
    "BPBResult",
    "ChoiceItem",
    "GenerationItem",
    "NewByteMasks",
    "UnigramModel",
    "bits_per_byte",
    "build_choice_items",
    "build_generation_items",
    "chance_accuracy",
    "compression",
    "generation_chrf",
    "greedy_continuations",
    "multiple_choice_accuracy",
    "paired_bootstrap",
    "run_lm_eval",
    "score_continuations",
    "score_sequences",
    "token_nll",
    "wilson_interval",
]
