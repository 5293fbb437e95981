"""`MATT`: the user-facing facade — tokenizers in, learned embeddings out.

    matt = MATT(config=MATTConfig(...), teacher_tokenizer=t_tok, student_tokenizer=s_tok)
    matt.prepare_dataset(dataset)                  # segmented + cached on disk
    mask = matt.prepare_frozen_embeddings_mask()   # shared tokens keep the teacher's rows
    result = matt.train(teacher_adapter, student_adapter)
    result.apply_to(full_model)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from matt.config import MATTConfig
from matt.result import TransferResult

logger = logging.getLogger(__name__)


class MATT:
    def __init__(self, config: MATTConfig | None = None, *, teacher_tokenizer, student_tokenizer):
        from matt.segmentation import check_offsets_support

        self.config = config or MATTConfig()
        check_offsets_support(teacher_tokenizer, "teacher_tokenizer")
        check_offsets_support(student_tokenizer, "student_tokenizer")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.dataset = None
        self.segmentation_stats = None
        """`SegmentationStats` of the last `prepare_dataset` call (documents, examples, skips)."""
        self._overlap = None

    # --- data ---------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, max_length: int | None = None, num_proc: int | None = None,
                        text_column: str | None = None):
        """Segment `dataset` (a `datasets.Dataset` or a list of texts) for both tokenizers.

        Cached on disk under `config.cache_dir`; a second call with the same data and
        tokenizers loads the cache. Returns the prepared dataset (also kept for `train`)."""
        from matt.batches import prepare_dataset

        prepared = prepare_dataset(
            dataset,
            self.teacher_tokenizer,
            self.student_tokenizer,
            max_length=max_length or self.config.max_length,
            num_proc=num_proc or self.config.num_proc,
            cache_dir=self.config.cache_dir,
            text_column=text_column or self.config.text_column,
        )
        self.dataset, self.segmentation_stats = prepared.dataset, prepared.stats
        return self.dataset

    # --- vocabulary overlap & initialisation --------------------------------------------------
    @property
    def overlap(self):
        """Byte-canonical token overlap between teacher and student vocabularies."""
        if self._overlap is None:
            from matt.overlap import token_overlap

            self._overlap = token_overlap(self.teacher_tokenizer, self.student_tokenizer)
            logger.info("Token overlap: %d of %d student tokens shared (%.1f%%)", self._overlap.num_shared,
                        len(self.student_tokenizer), 100 * self._overlap.ratio)
        return self._overlap

    def prepare_frozen_embeddings_mask(self) -> torch.Tensor:
        """Bool mask over the student vocabulary: True for tokens shared with the teacher (frozen)."""
        return self.overlap.frozen_mask()

    def initialize_student(self, teacher_model, method: str = "focus", texts: Iterable[str] | None = None, **kwargs):
        """A copy of `teacher_model` with embeddings for the student vocabulary (FOCUS/mean/random).

        Returns `(student_model, report)`; `texts` (target-language text) are needed for FOCUS."""
        from matt.initialization import build_student_model

        if method == "focus" and texts is None and self.dataset is None:
            raise ValueError("FOCUS initialisation needs target-language `texts` to train fastText on")
        return build_student_model(teacher_model, self.teacher_tokenizer, self.student_tokenizer, method,
                                   texts=texts, overlap=self.overlap, **kwargs)

    # --- training -----------------------------------------------------------------------------
    def train(self, teacher, student, *, dataset=None, log_fns=None, accelerator=None) -> TransferResult:
        """Train the student adapter's embeddings against the teacher adapter; see `matt.trainer`."""
        from matt.batches import AIMCollator, pad_id
        from matt.modeling import check_vocab
        from matt.trainer import train

        dataset = dataset if dataset is not None else self.dataset
        if dataset is None:
            raise ValueError("No dataset: call matt.prepare_dataset(...) first or pass dataset=")
        check_vocab(teacher, self.teacher_tokenizer)
        check_vocab(student, self.student_tokenizer)
        collator = AIMCollator(pad_id(self.teacher_tokenizer), pad_id(self.student_tokenizer))
        return train(self.config, teacher, student, dataset, collator, log_fns=log_fns, accelerator=accelerator)
