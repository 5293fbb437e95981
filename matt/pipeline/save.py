"""Save step: the adapted model as a HF directory + the student tokenizer next to it.

The learned embeddings were trained on a truncated copy of the teacher; they are installed into a
fresh full-depth teacher (`TransferResult.apply_to`), whose config gets the student's vocabulary
size and special-token ids, so `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` give a ready model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from matt.pipeline.init import with_embeddings

logger = logging.getLogger(__name__)


def adapted_model(teacher_model, result, student_tokenizer):
    """The full `teacher_model` (modified in place: pass a fresh copy) with the learned embeddings
    (`TransferResult`) installed and the student's special-token ids."""
    return with_embeddings(teacher_model, result, student_tokenizer, copy_model=False)


def save_adapted(model, tokenizer, directory: str | Path) -> Path:
    """`save_pretrained` model and tokenizer into `directory` (safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    logger.info("Adapted model + tokenizer saved to %s", directory)
    return directory
