"""Student embedding initialisation: copy shared rows, FOCUS / mean / random for the new ones.

FOCUS is checked against a slow re-implementation of its definition (Dobler & de Melo 2023, as
deepfocus 1.0.1 implements it in `FOCUS` / `focus_additional_token_initialization`): anchors are the
shared tokens that have a fastText vector (in the model's vocabulary and not all zero); a new token
with a vector gets sparsemax(cosine(new, anchors)) · (teacher rows of the anchors); a new token
without one is drawn from N(mean, std) of the teacher rows. One deliberate difference from
deepfocus, documented in matt.initialization: special tokens never take part (fastText always has a
"</s>" line-end word, which would otherwise hand the student's EOS a FOCUS row).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from matt.initialization import build_student_model, initialize_embeddings, train_token_fasttext
from matt.overlap import token_overlap
from matt.tiny import tiny_model

DIM = 12
PADDING_ROWS = 7


@pytest.fixture(scope="module")
def tokenizers(tokenizer_zoo):
    """Byte-level teacher, Metaspace + byte-fallback student (a vocabulary replacement)."""
    return tokenizer_zoo["llama3"], tokenizer_zoo["llama2"]


@pytest.fixture(scope="module")
def source(tokenizers):
    """Teacher rows with a non-zero mean and per-dimension spread, plus padding rows that must not
    enter any statistic (real checkpoints pad the matrix, e.g. Gemma and Qwen)."""
    teacher, _ = tokenizers
    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 2.0, DIM)
    rows = 3.0 + scale * torch.randn(len(teacher), DIM, generator=gen)
    return torch.cat([rows, torch.full((PADDING_ROWS, DIM), 1000.0)])


@pytest.fixture(scope="module")
def fasttext_model(tokenizers, style_corpus, tmp_path_factory):
    _, student = tokenizers
    return train_token_fasttext(style_corpus, student, dim=16, epochs=3, min_count=1, threads=1,
                                cache_dir=tmp_path_factory.mktemp("fasttext"))


def test_fasttext_learns_the_student_tokens_and_caches_one_complete_file(tokenizers, style_corpus, tmp_path,
                                                                       monkeypatch):
    """fastText sees the texts as the student's tokens; the model is cached under the tokenized text and
    its settings, and a second call loads it instead of training."""
    import fasttext

    _, student = tokenizers
    model = train_token_fasttext(style_corpus, student, dim=4, epochs=3, cache_dir=tmp_path)
    tokens = {token for text in style_corpus for token in student.tokenize(" ".join(text.split()))}
    assert set(model.words) - {"</s>"} == tokens  # min_count=1: every token seen gets a vector
    assert model.get_input_matrix().shape == (len(model.words) + 2_000_000, 4)  # words + n-gram buckets
    (cached,) = tmp_path.iterdir()
    assert cached.suffix == ".bin"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the model is cached")

    monkeypatch.setattr(fasttext, "train_unsupervised", no_training)
    again = train_token_fasttext(style_corpus, student, dim=4, epochs=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.get_input_matrix(), model.get_input_matrix())
    with pytest.raises(AssertionError, match="trained again"):
        train_token_fasttext(style_corpus, student, dim=4, epochs=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        train_token_fasttext(["  ", ""], student, cache_dir=tmp_path)


def student_special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def sparsemax(z: np.ndarray) -> np.ndarray:
    """Euclidean projection of z onto the probability simplex, by the sorting formula."""
    z_sorted = np.sort(z)[::-1]
    cumulative = np.cumsum(z_sorted)
    k = np.arange(1, len(z) + 1)
    k_max = k[1 + k * z_sorted > cumulative][-1]
    tau = (cumulative[k_max - 1] - 1) / k_max
    return np.maximum(z - tau, 0.0)


def reference_focus_weights(overlap, student, fasttext_model) -> dict[int, dict[int, float]]:
    """new student id -> {teacher id: weight} for every new token with a fastText vector."""
    words = set(fasttext_model.words)
    specials = student_special_ids(student)

    def vector(s_id):
        token = student.convert_ids_to_tokens(s_id)
        if s_id in specials or token not in words:
            return None
        vec = np.asarray(fasttext_model.get_word_vector(token), dtype=np.float64)
        return vec if np.abs(vec).sum() > 0 else None

    anchors = [(t_id, vec) for s_id, t_id in overlap.student_to_teacher.items() if (vec := vector(s_id)) is not None]
    matrix = np.stack([vec for _, vec in anchors])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    weights = {}
    for s_id in range(len(student)):
        if s_id in overlap.student_to_teacher or (vec := vector(s_id)) is None:
            continue
        w = sparsemax(matrix @ (vec / np.linalg.norm(vec)))
        assert abs(w.sum() - 1) < 1e-9
        weights[s_id] = {anchors[j][0]: float(w[j]) for j in np.nonzero(w)[0]}
    return weights


def apply_weights(weights: dict[int, float], rows: torch.Tensor) -> torch.Tensor:
    return sum(w * rows[t_id].double() for t_id, w in weights.items()).float()


# ------------------------------------------------------------------------------------------------
# initialize_embeddings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean", "random"])
def test_shared_rows_are_copied_bit_for_bit(tokenizers, source, method):
    teacher, student = tokenizers
    result = initialize_embeddings(source, teacher, student, method)
    overlap = token_overlap(teacher, student)
    assert result.overlap.student_to_teacher == overlap.student_to_teacher
    assert result.embeddings.shape == (len(student), DIM) and result.embeddings.dtype == torch.float32
    for s_id, t_id in overlap.student_to_teacher.items():
        assert torch.equal(result.embeddings[s_id], source[t_id])
        assert result.kinds[s_id] == "copied"
    new = [i for i in range(len(student)) if i not in overlap.student_to_teacher]
    assert len(new) > 50 and all(result.kinds[i] == method for i in new)
    assert result.counts == {"copied": overlap.num_shared, "focus": 0, "mean": len(new) * (method == "mean"),
                             "subword_mean": 0, "random": len(new) * (method == "random")}


def test_mean_is_the_exact_mean_of_the_real_teacher_rows(tokenizers, source):
    teacher, student = tokenizers
    result = initialize_embeddings(source, teacher, student, "mean")
    expected = source[:len(teacher)].double().mean(dim=0).float()
    new = [i for i, kind in enumerate(result.kinds) if kind == "mean"]
    for i in new:
        torch.testing.assert_close(result.embeddings[i], expected, rtol=0, atol=1e-6)
    assert result.embeddings[new].max() < 100  # the 1000-valued padding rows did not count


def test_random_is_seeded_and_follows_the_teacher_statistics(tokenizers):
    teacher, student = tokenizers
    gen = torch.Generator().manual_seed(5)
    wide = 96  # enough draws for tight statistics from the ~70 new tokens
    source = torch.cat([-2.0 + torch.linspace(0.1, 3.0, wide) * torch.randn(len(teacher), wide, generator=gen),
                        torch.full((PADDING_ROWS, wide), 1000.0)])
    first = initialize_embeddings(source, teacher, student, "random", seed=1)
    again = initialize_embeddings(source, teacher, student, "random", seed=1)
    other = initialize_embeddings(source, teacher, student, "random", seed=2)
    assert torch.equal(first.embeddings, again.embeddings)
    new = [i for i, kind in enumerate(first.kinds) if kind == "random"]
    assert not torch.equal(first.embeddings[new], other.embeddings[new])
    real = source[:len(teacher)]
    z = (first.embeddings[new] - real.mean(0)) / real.std(0)  # standardised per dimension
    n = z.numel()
    assert n > 3000
    assert abs(z.mean().item()) < 4 / n ** 0.5
    assert abs(z.std().item() - 1) < 0.05
    per_dim_std = first.embeddings[new].std(0) / real.std(0)  # the spread of each dimension is kept
    assert torch.all((per_dim_std > 0.55) & (per_dim_std < 1.45))


def test_focus_matches_the_definition(tokenizers, source, fasttext_model):
    teacher, student = tokenizers
    result = initialize_embeddings(source, teacher, student, "focus", fasttext_model=fasttext_model, seed=3,
                                   focus_fallback="random")
    overlap = result.overlap
    weights = reference_focus_weights(overlap, student, fasttext_model)
    focus_ids = [i for i, kind in enumerate(result.kinds) if kind == "focus"]
    assert sorted(weights) == focus_ids and len(focus_ids) > 20
    for s_id in focus_ids:
        torch.testing.assert_close(result.embeddings[s_id], apply_weights(weights[s_id], source), rtol=1e-5, atol=1e-5)
    assert any(len(w) > 1 for w in weights.values())  # real combinations, not only nearest neighbours
    # new tokens without a fastText vector (byte tokens, specials, unseen pieces) fall back to random draws
    fallback = [i for i, kind in enumerate(result.kinds) if kind == "random"]
    words = set(fasttext_model.words)
    assert len(fallback) > 10
    assert all(student.convert_ids_to_tokens(i) not in words or i in student_special_ids(student) for i in fallback)
    assert result.counts["copied"] == overlap.num_shared
    assert sum(result.counts.values()) == len(student)
    again = initialize_embeddings(source, teacher, student, "focus", fasttext_model=fasttext_model, seed=3,
                                  focus_fallback="random")
    assert torch.equal(again.embeddings, result.embeddings)  # fallback draws are seeded too


class FakeFastText:
    """Just what FOCUS reads from a fastText model: its words and their vectors."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.words = list(vectors)
        self.vectors = vectors

    def get_word_vector(self, word: str) -> np.ndarray:
        return self.vectors[word]


def test_focus_anchor_and_fallback_rules(tokenizers, source, text_tools, style_corpus):
    """Specials (named, or added as special like chat markers) never take part, even when fastText
    has a vector for them; an all-zero vector counts as no vector; shared tokens are the anchors."""
    teacher, _ = tokenizers
    student = text_tools.build("llama2", style_corpus, 300)
    student.add_tokens(["<|im_start|>"], special_tokens=True)
    overlap = token_overlap(teacher, student)
    new = [i for i in range(len(student)) if i not in overlap.student_to_teacher]
    shared = [i for i in overlap.student_to_teacher if i not in student_special_ids(student)]
    rng = np.random.default_rng(0)
    chosen = shared[:25] + new[:15] + [student.eos_token_id, student.convert_tokens_to_ids("<|im_start|>")]
    vectors = {student.convert_ids_to_tokens(i): rng.normal(size=8).astype(np.float32) for i in chosen}
    zero = student.convert_ids_to_tokens(new[15])
    vectors[zero] = np.zeros(8, dtype=np.float32)
    model = FakeFastText(vectors)
    result = initialize_embeddings(source, teacher, student, "focus", fasttext_model=model, seed=0,
                                   focus_fallback="random")
    weights = reference_focus_weights(overlap, student, model)
    assert sorted(weights) == [i for i, kind in enumerate(result.kinds) if kind == "focus"]
    special_new = [i for i in (student.eos_token_id, student.convert_tokens_to_ids("<|im_start|>")) if i in new]
    assert special_new and all(result.kinds[i] == "random" for i in special_new)
    assert result.kinds[new[15]] == "random"
    assert all(result.kinds[i] == "focus" for i in new[:15] if i not in student_special_ids(student))
    for s_id, w in weights.items():
        assert set(w) <= {overlap.student_to_teacher[i] for i in shared[:25]}
        torch.testing.assert_close(result.embeddings[s_id], apply_weights(w, source), rtol=1e-5, atol=1e-5)


def test_focus_trains_fasttext_from_texts(tokenizers, source, style_corpus, tmp_path):
    """Without a fastText model, `texts` train one (min_count=1: rare pieces still get vectors)."""
    teacher, student = tokenizers
    result = initialize_embeddings(source, teacher, student, "focus", texts=style_corpus, fasttext_dim=8,
                                   cache_dir=tmp_path)
    assert result.counts["focus"] > 20


def test_initialize_embeddings_bad_inputs(tokenizers, source, tokenizer_zoo):
    teacher, student = tokenizers
    other = tokenizer_zoo["unigram@small"]
    assert len(other) != len(student)
    with pytest.raises(ValueError, match="overlap was computed for"):
        initialize_embeddings(source, teacher, student, "mean", overlap=token_overlap(teacher, other))
    with pytest.raises(ValueError, match="Unknown initialisation method 'fancy'"):
        initialize_embeddings(source, teacher, student, "fancy")
    with pytest.raises(ValueError, match="texts"):
        initialize_embeddings(source, teacher, student, "focus")
    with pytest.raises(ValueError, match="rows"):
        initialize_embeddings(source[:10], teacher, student, "mean")
    with pytest.raises(ValueError, match="vocab, dim"):
        initialize_embeddings(source[0], teacher, student, "mean")
    with pytest.raises(ValueError, match="non-empty"):
        initialize_embeddings(source, teacher, student, "focus", texts=["  ", "\n"])


# ------------------------------------------------------------------------------------------------
# build_student_model
# ------------------------------------------------------------------------------------------------
def padded_teacher(family: str, teacher_tokenizer):
    """A tiny model whose embedding matrix has padding rows beyond the tokenizer (as real ones do)."""
    return tiny_model(family, len(teacher_tokenizer) + PADDING_ROWS, seed=0)


@pytest.mark.parametrize("method", ["mean", "focus"])
def test_untied_head_is_initialised_with_the_same_weights(tokenizers, fasttext_model, method):
    teacher_tok, student_tok = tokenizers
    teacher = padded_teacher("qwen3", teacher_tok)
    assert not teacher.config.tie_word_embeddings
    student, report = build_student_model(teacher, teacher_tok, student_tok, method, fasttext_model=fasttext_model)
    t_in, t_out = teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight
    s_in, s_out = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    assert s_in.shape == s_out.shape == (len(student_tok), t_in.shape[1])
    assert s_out is not s_in and report.output_embeddings_initialized and not report.tied
    overlap = token_overlap(teacher_tok, student_tok)
    for s_id, t_id in overlap.student_to_teacher.items():
        assert torch.equal(s_in[s_id], t_in[t_id]) and torch.equal(s_out[s_id], t_out[t_id])
    n = len(teacher_tok)
    if method == "mean":
        new = [i for i in range(len(student_tok)) if i not in overlap.student_to_teacher]
        torch.testing.assert_close(s_in[new], t_in[:n].mean(0).expand(len(new), -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(s_out[new], t_out[:n].mean(0).expand(len(new), -1), rtol=0, atol=1e-6)
    else:
        weights = reference_focus_weights(overlap, student_tok, fasttext_model)
        assert report.counts["focus"] == len(weights) > 20
        for s_id, w in weights.items():
            torch.testing.assert_close(s_in[s_id], apply_weights(w, t_in.detach()), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s_out[s_id], apply_weights(w, t_out.detach()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tied_models_stay_tied(tokenizers, family):
    teacher_tok, student_tok = tokenizers
    teacher = padded_teacher(family, teacher_tok)
    student, report = build_student_model(teacher, teacher_tok, student_tok, "random", seed=0)
    assert report.tied and not report.output_embeddings_initialized
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert type(student.get_input_embeddings()) is type(teacher.get_input_embeddings())  # Gemma's scaled embedding
    with torch.no_grad():
        logits = student(torch.tensor([student_tok("Привіт, світе!")["input_ids"]])).logits
    assert logits.shape[-1] == len(student_tok) and torch.isfinite(logits).all()


def test_build_student_model_leaves_the_teacher_untouched_and_sets_the_vocabulary(tokenizers):
    teacher_tok, student_tok = tokenizers
    teacher = padded_teacher("qwen3", teacher_tok)
    before = copy.deepcopy(teacher.state_dict())
    config_before = teacher.config.to_dict()
    student, report = build_student_model(teacher, teacher_tok, student_tok, "mean")
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert teacher.config.to_dict() == config_before
    assert student.config.vocab_size == len(student_tok) == report.student_vocab_size == report.embedding_rows
    for role in ("pad", "bos", "eos"):
        value = getattr(student_tok, f"{role}_token_id")
        assert getattr(student.config, f"{role}_token_id") == value
        assert getattr(student.generation_config, f"{role}_token_id") == value
    overlap = token_overlap(teacher_tok, student_tok)
    assert report.overlap_ratio == overlap.ratio and report.num_shared == overlap.num_shared
    assert report.counts["copied"] + report.counts["mean"] == len(student_tok)
    assert report.to_dict()["overlap_summary"]["ratio"] == overlap.ratio


def test_build_student_model_rejects_a_teacher_smaller_than_its_tokenizer(tokenizers):
    teacher_tok, student_tok = tokenizers
    teacher = tiny_model("llama", len(teacher_tok) - 5)
    with pytest.raises(ValueError, match="embedding rows but tokenizer has"):
        build_student_model(teacher, teacher_tok, student_tok, "mean")
    with pytest.raises(ValueError, match="Unknown initialisation method"):
        build_student_model(padded_teacher("llama", teacher_tok), teacher_tok, student_tok, "zeros")
