"""The README's Python quick start, step for step, on a tiny Llama and in-test tokenizers.

Keeps the documented API honest: if a call in the README changes, this test must change with it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from matt import MATT, MATTConfig
from matt.modeling import LlamaForAIM
from matt.tiny import SAMPLE_TEXTS, tiny_model


def test_readme_quick_start(tmp_path, byte_level_tokenizer, sentencepiece_tokenizer):
    teacher_tok, student_tok = byte_level_tokenizer, sentencepiece_tokenizer
    teacher_model = tiny_model("llama", len(teacher_tok))
    train_texts = list(SAMPLE_TEXTS)

    matt = MATT(config=MATTConfig(max_steps=4, batch_size=4, lr=1e-3, loss="mse", aim_impl="aim",
                                  output_embeddings="keep_init", cache_dir=str(tmp_path / "cache"),
                                  progress_bar=False),
                teacher_tokenizer=teacher_tok, student_tokenizer=student_tok)
    matt.prepare_dataset(train_texts, max_length=256, num_proc=2)
    student_model, report = matt.initialize_student(teacher_model, method="focus", texts=train_texts)
    mask = matt.prepare_frozen_embeddings_mask()

    teacher = LlamaForAIM.from_pretrained(teacher_model, n_layers=2)
    student = LlamaForAIM.from_pretrained(student_model, n_layers=2, frozen_embeddings_mask=mask)
    result = matt.train(teacher, student)

    full = tiny_model("llama", len(teacher_tok))
    result.apply_to(full)
    full.save_pretrained(tmp_path / "adapted")
    student_tok.save_pretrained(tmp_path / "adapted")

    assert 0 < report.overlap_ratio < 1 and matt.segmentation_stats.examples > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapted")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapted")
    assert len(tokenizer) == len(student_tok)
    assert torch.equal(reloaded.get_input_embeddings().weight, result.input_embeddings)
    assert torch.equal(reloaded.get_output_embeddings().weight, result.output_embeddings)  # keep_init: untied
