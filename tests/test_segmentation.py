"""Segmentation against the spec of issue 2, via a slow reference written straight from the spec.

The reference (`reference_segment_ids`) does not use non-whitespace coordinates, difference arrays or
bisection like `matt.segmentation`: it walks over the characters of the text and asks, for every
non-whitespace character c, "does each tokenization have a token boundary right before c?", i.e.
some content token's first non-whitespace character is c, some content token covers a
non-whitespace character before c, and no content token covers a non-whitespace character before c
*and* c itself (a straddling token). Segment boundaries are the characters where both answer yes;
a token gets the segment of its characters (all of them must lie in one segment).

Interpretations of the spec (it leaves these open), shared by the module and the reference:
* Whitespace-only (or zero-width, e.g. offsets trimmed by ByteLevel(trim_offsets=True)) tokens
  belong to the segment of the next non-whitespace character, or the last segment at the end.
  GPT-2 "Ġ" and SentencePiece "▁" both attach spaces to the following word.
* "Special" (segment id -100) means the tokens a tokenizer *inserts*: those its post-processor
  adds (BOS/EOS) and any other zero-width special token. A token matched from the text covers
  characters and is content like any other token, whatever its flags (issue 12): a chat marker
  added with special=True or a literal "<s>" written in the document is a special token for one
  tokenizer and plain characters for another, and both sides must cover the same characters.
  Likewise an unknown token produced from text, also when only the backend model names it.
* Text with no non-whitespace character (or a side without any content token) has no segment:
  every id is -100.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from matt.segmentation import IGNORE_INDEX, SegmentationStats, segment_document, segment_ids

WHITESPACE = re.compile(r"\s")


# ------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------
def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids


def unk_id_of(tokenizer) -> int | None:
    """The unknown token, from the wrapper or else from the serialized backend model."""
    if tokenizer.unk_token_id is not None:
        return tokenizer.unk_token_id
    unk = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("unk_token")
    return tokenizer.convert_tokens_to_ids(unk) if unk else None


def reference_tokens(text: str, tokenizer) -> list[dict]:
    """Each token with `chars`: the positions of the non-whitespace characters it covers
    (None for special tokens)."""
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    specials, unk = special_token_ids(tokenizer), unk_id_of(tokenizer)
    tokens = []
    for token_id, (start, end), added in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        is_special = bool(added) or (start == end and token_id in specials and token_id != unk)
        chars = None if is_special else [c for c in range(start, end) if not WHITESPACE.match(text[c])]
        tokens.append({"id": token_id, "start": start, "end": end, "chars": chars})
    return tokens


def reference_boundaries(text: str, tokens: list[dict]) -> set[int]:
    """Non-whitespace character positions c with a token boundary right before c."""
    content = [t["chars"] for t in tokens if t["chars"]]
    boundaries = set()
    for c, char in enumerate(text):
        if WHITESPACE.match(char):
            continue
        starts_here = any(chars[0] == c for chars in content)
        something_before = any(chars[0] < c for chars in content)
        straddled = any(chars[0] < c <= chars[-1] for chars in content)
        if starts_here and something_before and not straddled:
            boundaries.add(c)
    return boundaries


def reference_assign(text: str, tokens: list[dict], common: set[int], num_segments: int) -> list[int]:
    def segment_of(c: int) -> int:
        return sum(1 for b in common if b <= c)

    ids = []
    for token in tokens:
        if token["chars"] is None:
            ids.append(IGNORE_INDEX)
        elif token["chars"]:
            segments = {segment_of(c) for c in token["chars"]}
            assert len(segments) == 1, "a token straddles a common boundary"
            ids.append(segments.pop())
        else:  # whitespace only or zero width: the next non-whitespace character's segment
            following = [c for c in range(token["start"], len(text)) if not WHITESPACE.match(text[c])]
            ids.append(segment_of(following[0]) if following else num_segments - 1)
    return ids


def reference_segment_ids(text: str, teacher, student) -> tuple[list[int], list[int]]:
    sides = [reference_tokens(text, tok) for tok in (teacher, student)]
    has_content = all(any(t["chars"] for t in tokens) for tokens in sides)
    if not has_content:
        return tuple([IGNORE_INDEX] * len(tokens) for tokens in sides)
    common = reference_boundaries(text, sides[0]) & reference_boundaries(text, sides[1])
    num_segments = len(common) + 1
    return tuple(reference_assign(text, tokens, common, num_segments) for tokens in sides)


# ------------------------------------------------------------------------------------------------
# invariants of any valid segmentation
# ------------------------------------------------------------------------------------------------
def assert_valid(text: str, teacher, student, t_ids: list[int], s_ids: list[int]) -> None:
    sides = [(teacher, t_ids, reference_tokens(text, teacher)), (student, s_ids, reference_tokens(text, student))]
    counts = []
    for tok, ids, tokens in sides:
        assert len(ids) == len(tok(text)["input_ids"]) == len(tokens)
        content = [i for i in ids if i != IGNORE_INDEX]
        assert content == sorted(content), "segment ids are not in text order"
        for seg, token in zip(ids, tokens):
            assert (seg == IGNORE_INDEX) == (token["chars"] is None or not any(t["chars"] for t in tokens))
        counts.append(max(content, default=-1) + 1)
        for k in range(counts[-1]):  # every segment has a token with characters on this side
            assert any(seg == k and token["chars"] for seg, token in zip(ids, tokens)), (k, ids)
    assert counts[0] == counts[1], "different number of segments on the two sides"
    # tokens (of either side) that share a character share a segment
    owner: dict[int, int] = {}
    for _, ids, tokens in sides:
        for seg, token in zip(ids, tokens):
            for c in token["chars"] or []:
                assert owner.setdefault(c, seg) == seg, f"character {text[c]!r} in segments {owner[c]} and {seg}"


# ------------------------------------------------------------------------------------------------
# hand-built tokenizers with exactly known tokens
# ------------------------------------------------------------------------------------------------
def gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the byte-level BPE alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def piece_tokenizer(pieces, style: str, *, alphabet: str = "", bos: bool = False, eos: bool = False,
                    trim_offsets: bool = False, use_regex: bool = True, specials=("<s>", "</s>")):
    """A BPE whose merges build each of `pieces` left to right (and nothing else).

    style "bytelevel": GPT-2 byte alphabet; pieces are text or raw `bytes` (e.g. a partial char).
    style "metaspace": Metaspace(prepend "first") + byte fallback; "▁" stands for a space.
    style "gemma": normalizer Replace(" ", "▁"), no pre-tokenizer, byte fallback.
    style "spaces": every whitespace character is its own token.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_char = gpt2_byte_to_char()
    vocab: dict[str, int] = {}
    for special in specials:
        vocab[special] = len(vocab)
    if style == "bytelevel":
        symbols = [byte_char[b] for b in range(256)]
        spelled = [p if isinstance(p, bytes) else p.encode("utf-8") for p in pieces]
        spelled = ["".join(byte_char[b] for b in p) for p in spelled]
    else:
        spelled_alphabet = alphabet if style == "spaces" else alphabet.replace(" ", "▁")
        symbols = sorted(set(spelled_alphabet + "".join(pieces)))
        symbols += [f"<0x{b:02X}>" for b in range(256)]
        spelled = [p.replace(" ", "▁") for p in pieces]
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for piece in spelled:
        for k in range(1, len(piece)):
            if piece[:k + 1] not in vocab:
                merges.append((piece[:k], piece[k]))
                vocab[piece[:k + 1]] = len(vocab)
    unk = None if style == "bytelevel" else "<unk>"
    if unk:
        vocab[unk] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=style != "bytelevel"))
    tok.add_special_tokens(list(specials))
    post = []
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
        post.append(processors.ByteLevel(trim_offsets=trim_offsets, add_prefix_space=False))
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    elif style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
    elif style == "spaces":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    else:
        raise ValueError(style)
    template = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    if bos or eos:
        post.append(processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in specials]))
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], unk_token=unk)


def tokens_of(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def check(text, teacher, student, expected_teacher=None, expected_student=None):
    """segment_ids == reference (== the expected ids, when given) and all invariants hold."""
    t_ids, s_ids = segment_ids(text, teacher, student)
    assert (t_ids, s_ids) == reference_segment_ids(text, teacher, student)
    if expected_teacher is not None:
        assert t_ids == expected_teacher
        assert s_ids == expected_student
    assert_valid(text, teacher, student, t_ids, s_ids)
    return t_ids, s_ids


# ------------------------------------------------------------------------------------------------
# against the reference on many texts x many tokenizer styles
# ------------------------------------------------------------------------------------------------
def test_reference_detects_a_wrong_segmentation():
    """The checker can fail: a shifted common boundary violates the invariants."""
    teacher = piece_tokenizer(["trans", "fer"], "bytelevel")
    student = piece_tokenizer(["▁tran", "fer"], "metaspace", alphabet="transfer")
    assert tokens_of(teacher, "transfer") == ["trans", "fer"]
    assert tokens_of(student, "transfer") == ["▁tran", "s", "fer"]
    assert_valid("transfer", teacher, student, [0, 1], [0, 0, 1])  # the right answer passes
    with pytest.raises(AssertionError, match="segments 0 and 1"):
        assert_valid("transfer", teacher, student, [0, 1], [0, 1, 1])  # "s" cut away from "tran"
    with pytest.raises(AssertionError, match="different number of segments"):
        assert_valid("transfer", teacher, student, [0, 1], [0, 0, 0])


def test_matches_reference_on_random_texts_and_all_style_pairs(tokenizer_zoo, text_tools):
    rng = random.Random(1234)
    texts = [text_tools.random_text(rng) for _ in range(36)]
    names = sorted(tokenizer_zoo)
    pairs = list(itertools.product(names, names))
    checked = 0
    for i, text in enumerate(texts):
        # every ordered pair on some texts, a random third of them on the others
        chosen = pairs if i < 4 else rng.sample(pairs, len(pairs) // 3)
        for teacher_name, student_name in chosen:
            teacher, student = tokenizer_zoo[teacher_name], tokenizer_zoo[student_name]
            try:
                check(text, teacher, student)
            except AssertionError as error:
                raise AssertionError(f"{teacher_name} -> {student_name} on {text!r}: {error}") from error
            checked += 1
    assert checked > 1500


def test_identical_tokenizers_give_identical_ids(tokenizer_zoo, text_tools):
    """Same tokenizer on both sides: identical ids; every token start that nothing straddles is a cut."""
    rng = random.Random(7)
    for text in [text_tools.random_text(rng) for _ in range(10)]:
        for tok in tokenizer_zoo.values():
            t_ids, s_ids = check(text, tok, tok)
            assert t_ids == s_ids
            tokens = reference_tokens(text, tok)
            if any(t["chars"] for t in tokens):
                assert max(t_ids) + 1 == len(reference_boundaries(text, tokens)) + 1


# ------------------------------------------------------------------------------------------------
# explicit spec cases
# ------------------------------------------------------------------------------------------------
def test_mid_word_cut_where_both_tokenizations_agree():
    text = "transfer learning"
    teacher = piece_tokenizer(["trans", "fer", " learn", "ing"], "bytelevel")
    student = piece_tokenizer(["▁tran", "fer", "▁learning"], "metaspace", alphabet=text)
    assert tokens_of(teacher, text) == ["trans", "fer", "Ġlearn", "ing"]
    assert tokens_of(student, text) == ["▁tran", "s", "fer", "▁learning"]
    # "trans|fer" and "tran|s|fer" agree on a cut before "f" (mid-word), not before "s"
    check(text, teacher, student, [0, 1, 2, 2], [0, 0, 1, 2])


def test_whitespace_attached_to_either_side_or_separate():
    text = "hello world"
    styles = {
        "gpt2": (piece_tokenizer(["hello", " world"], "bytelevel"), ["hello", "Ġworld"], [0, 1]),
        "gpt2_trim": (piece_tokenizer(["hello", " world"], "bytelevel", trim_offsets=True), ["hello", "Ġworld"],
                      [0, 1]),
        "metaspace": (piece_tokenizer(["▁hello", "▁world"], "metaspace", alphabet=text), ["▁hello", "▁world"], [0, 1]),
        "gemma": (piece_tokenizer(["hello▁", "world"], "gemma", alphabet=text), ["hello▁", "world"], [0, 1]),
        "spaces": (piece_tokenizer(["hello", "world"], "spaces", alphabet=text), ["hello", " ", "world"], [0, 1, 1]),
    }
    for name, (tok, tokens, _) in styles.items():
        assert tokens_of(tok, text) == tokens, name
    for (_, (teacher, _, t_expected)), (_, (student, _, s_expected)) in itertools.product(styles.items(), repeat=2):
        check(text, teacher, student, t_expected, s_expected)


def test_leading_trailing_and_repeated_whitespace():
    text = "  hello \t\n world  "
    teacher = piece_tokenizer(["hello", " world", "  "], "bytelevel")
    student = piece_tokenizer(["hello", "world"], "spaces", alphabet=text)
    t_ids, s_ids = check(text, teacher, student)
    t_tokens, s_tokens = tokens_of(teacher, text), tokens_of(student, text)
    # whitespace before "hello" joins segment 0, whitespace between words the "world" segment, the end the last
    assert [s for s, tok in zip(s_ids, s_tokens) if tok.strip() == ""] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert t_ids[0] == 0 and t_ids[-1] == 1 and max(t_ids) == 1
    assert len(t_tokens) == len(t_ids) and len(s_tokens) == len(s_ids)


def test_trimmed_offsets_of_byte_level_post_processor():
    """ByteLevel(trim_offsets=True) (GPT-2 and others) reports "Ġworld" without its space and a lone
    "Ġ" with zero width; the segmentation must not care."""
    text = "  hello  world "
    trimmed = piece_tokenizer(["hello", " world"], "bytelevel", trim_offsets=True)
    untrimmed = piece_tokenizer(["hello", " world"], "bytelevel")
    student = piece_tokenizer(["▁hello", "▁world"], "metaspace", alphabet=text)
    enc = trimmed(text, return_offsets_mapping=True)
    assert tokens_of(trimmed, text) == ["Ġ", "Ġ", "hello", "Ġ", "Ġworld", "Ġ"]
    assert enc["offset_mapping"][4] == (9, 14)  # "Ġworld" without its space
    assert any(start == end for start, end in enc["offset_mapping"])  # zero-width "Ġ"
    expected = [0, 0, 0, 1, 1, 1]
    check(text, trimmed, untrimmed, expected, expected)
    t_ids, s_ids = check(text, trimmed, student)
    assert t_ids == expected and max(s_ids) == 1


def test_byte_tokens_inside_one_character_share_a_segment():
    """Byte-level tokens of one 4-byte emoji share its offsets; byte fallback gives four <0xNN>
    tokens with the same offsets. Neither side may cut inside the emoji."""
    text = "x🙂y"
    teacher = piece_tokenizer([b"\xf0\x9f", b"\x99\x82"], "bytelevel", use_regex=False)
    student = piece_tokenizer(["▁x", "y"], "metaspace", alphabet="xy")
    assert tokens_of(teacher, text) == ["x", "ðŁ", "ĻĤ", "y"]
    assert tokens_of(student, text) == ["▁x", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "y"]
    assert teacher(text, return_offsets_mapping=True)["offset_mapping"][1:3] == [(1, 2), (1, 2)]
    check(text, teacher, student, [0, 1, 1, 2], [0, 1, 1, 1, 1, 2])


def test_overlapping_byte_level_offsets_force_a_shared_segment():
    """"aĠð" (a, space, first byte of 🙂) overlaps "Ł","Ļ","Ĥ" (the emoji's other bytes): the teacher
    has no boundary before 🙂, so "a" and 🙂 form one segment although the student cuts there."""
    text = "a 🙂b"
    teacher = piece_tokenizer([b"a \xf0"], "bytelevel", use_regex=False)
    student = piece_tokenizer(["▁a", "b"], "metaspace", alphabet="ab")
    assert tokens_of(teacher, text) == ["aĠð", "Ł", "Ļ", "Ĥ", "b"]
    offsets = teacher(text, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[:2] == [(0, 3), (2, 3)]  # overlapping spans
    assert tokens_of(student, text) == ["▁a", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "b"]
    check(text, teacher, student, [0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1])


def test_byte_fallback_tokens_on_unseen_characters(tokenizer_zoo):
    text = "漢字 світ 🦄"
    for name in ("llama2", "gemma", "unigram", "char_spaces"):
        tok = tokenizer_zoo[name]
        assert any(t.startswith("<0x") for t in tokens_of(tok, text)), name
        for other in ("gpt2", "llama3", "qwen", "wordlevel", "llama2@small"):
            check(text, tok, tokenizer_zoo[other])
            check(text, tokenizer_zoo[other], tok)


def test_special_tokens_get_ignore_index():
    text = "hello world"
    plain = piece_tokenizer(["hello", " world"], "bytelevel")
    both = piece_tokenizer(["▁hello", "▁world"], "metaspace", alphabet=text, bos=True, eos=True)
    assert tokens_of(both, text) == ["<s>", "▁hello", "▁world", "</s>"]
    check(text, plain, both, [0, 1], [IGNORE_INDEX, 0, 1, IGNORE_INDEX])
    check(text, both, plain, [IGNORE_INDEX, 0, 1, IGNORE_INDEX], [0, 1])


def test_special_tokens_written_in_the_text_are_content():
    """A literal "<s>" in the text is the special token on a side that has it and ordinary text on a
    side that does not: either way it covers the characters "<s>", which form a segment of their own
    on both sides; only the inserted BOS gets -100. A chat marker added with special=True too."""
    text = "hello <s> world"
    with_s = piece_tokenizer(["hello", " world"], "bytelevel", bos=True)
    without_s = piece_tokenizer(["▁hello", "▁world"], "metaspace", alphabet=text + "<s>", specials=("<b>", "<e>"))
    assert tokens_of(with_s, text) == ["<s>", "hello", "Ġ", "<s>", "Ġworld"]
    assert tokens_of(without_s, text) == ["▁hello", "▁", "<", "s", ">", "▁world"]
    t_ids, s_ids = check(text, with_s, without_s)
    assert t_ids == [IGNORE_INDEX, 0, 1, 1, 2]
    assert s_ids == [0, 1, 1, 1, 1, 2]

    text = "hello <|im_start|> world"
    marker = piece_tokenizer(["▁hello", "▁world"], "metaspace", alphabet=text)
    check(text, marker, with_s)  # the marker as plain characters
    marker.add_tokens(["<|im_start|>"], special_tokens=True)
    marker_id = marker.convert_tokens_to_ids("<|im_start|>")
    assert marker_id not in marker.all_special_ids  # only the added-token flag says it is special
    t_ids, s_ids = check(text, marker, with_s)
    assert t_ids[marker(text)["input_ids"].index(marker_id)] == 1  # "hello" | "<|im_start|>" | "world"
    assert max(t_ids) == max(s_ids) == 2


def test_unknown_tokens_from_text_are_content(tokenizer_zoo):
    tok = tokenizer_zoo["wordlevel"]
    text = "Привіт 漢字 world"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id in ids
    t_ids, _ = check(text, tok, tokenizer_zoo["llama2"])
    assert all(seg != IGNORE_INDEX for seg in t_ids)


@pytest.mark.parametrize("text", ["", " ", "  \n\t ", "\u00a0\r\n"])
def test_empty_and_whitespace_only_texts_have_no_segment(tokenizer_zoo, text):
    for teacher, student in [("llama3", "llama2"), ("gpt2", "mistral_eos"), ("unigram", "wordlevel")]:
        t_tok, s_tok = tokenizer_zoo[teacher], tokenizer_zoo[student]
        t_ids, s_ids = segment_ids(text, t_tok, s_tok)
        assert set(t_ids) <= {IGNORE_INDEX} and set(s_ids) <= {IGNORE_INDEX}
        assert len(t_ids) == len(t_tok(text)["input_ids"]) and len(s_ids) == len(s_tok(text)["input_ids"])
        assert (t_ids, s_ids) == reference_segment_ids(text, t_tok, s_tok)
        stats = SegmentationStats()
        assert segment_document(text, t_tok, s_tok, max_length=16, stats=stats) == []
        assert stats.skipped_empty == 1 and stats.examples == 0


def test_bad_inputs(tokenizer_zoo):
    from transformers import ByT5Tokenizer

    with pytest.raises(TypeError, match="str"):
        segment_ids(None, tokenizer_zoo["gpt2"], tokenizer_zoo["llama2"])
    slow = ByT5Tokenizer()
    for args in [(slow, tokenizer_zoo["llama2"]), (tokenizer_zoo["llama2"], slow)]:
        with pytest.raises(ValueError, match="not a fast tokenizer"):
            segment_ids("hello", *args)
        with pytest.raises(ValueError, match="not a fast tokenizer"):
            segment_document("hello", *args, max_length=16)


# ------------------------------------------------------------------------------------------------
# segment_document: truncation and continuation
# ------------------------------------------------------------------------------------------------
def document_sides(text, teacher, student) -> dict[str, dict]:
    """Per side of the whole (unchunked) document: leading/trailing specials, content ids and the
    token range of every segment. A special token inside the text belongs to the segment before it
    (to segment 0 before the first one), which is where a chunk keeps it."""
    full = dict(zip(("teacher", "student"), segment_ids(text, teacher, student)))
    sides = {}
    for side, tok in (("teacher", teacher), ("student", student)):
        enc = tok(text, return_special_tokens_mask=True)
        ids, mask, segs = enc["input_ids"], enc["special_tokens_mask"], full[side]
        first = next(i for i, m in enumerate(mask) if not m)
        last = max(i for i, m in enumerate(mask) if not m) + 1
        content, content_segs = ids[first:last], segs[first:last]
        num_segments = max(content_segs) + 1
        begins = [0] + [content_segs.index(k) for k in range(1, num_segments)] + [len(content)]
        sides[side] = dict(lead=ids[:first], trail=ids[last:], content=content, segs=content_segs,
                           ranges=list(zip(begins, begins[1:])), num_segments=num_segments)
    return sides


def assert_chunks_cover_document(text, teacher, student, examples, max_length, stats):
    """Chunks fit, keep the specials, are whole runs of consecutive segments renumbered from 0, add up
    to the document minus exactly the segments too long to fit alone, and are greedy (maximal)."""
    sides = document_sides(text, teacher, student)
    num_segments = sides["teacher"]["num_segments"]
    budget = {side: max_length - len(d["lead"]) - len(d["trail"]) for side, d in sides.items()}
    fits = [all(d["ranges"][k][1] - d["ranges"][k][0] <= budget[side] for side, d in sides.items())
            for k in range(num_segments)]
    assert stats.skipped_segments == fits.count(False)
    kept = [k for k in range(num_segments) if fits[k]]
    position = 0
    runs = []
    for example in examples:
        run = kept[position:position + example.num_segments]
        assert run == list(range(run[0], run[0] + len(run))), "a chunk glues segments across a skipped one"
        position += example.num_segments
        runs.append(run)
        for side, d in sides.items():
            ids, segs = getattr(example, f"{side}_input_ids"), getattr(example, f"{side}_segment_ids")
            assert len(ids) == len(segs) <= max_length
            n_lead, n_trail = len(d["lead"]), len(d["trail"])
            assert ids[:n_lead] == d["lead"] and ids[len(ids) - n_trail:] == d["trail"]
            assert segs[:n_lead] == [IGNORE_INDEX] * n_lead and segs[len(segs) - n_trail:] == [IGNORE_INDEX] * n_trail
            lo, hi = d["ranges"][run[0]][0], d["ranges"][run[-1]][1]
            assert ids[n_lead:len(ids) - n_trail] == d["content"][lo:hi]
            renumbered = [s - run[0] if s != IGNORE_INDEX else s for s in d["segs"][lo:hi]]
            assert segs[n_lead:len(segs) - n_trail] == renumbered
    assert position == len(kept), "segments were dropped although they fit"
    for run, following in zip(runs, runs[1:]):  # greedy: the next segment did not fit any more
        if following[0] == run[-1] + 1:
            assert any(d["ranges"][following[0]][1] - d["ranges"][run[0]][0] > budget[side]
                       for side, d in sides.items())


@pytest.mark.parametrize("teacher_name,student_name", [
    ("llama3", "mistral_eos"), ("gpt2", "unigram"), ("gemma", "qwen"), ("char_spaces", "wordlevel"),
    ("bytelevel_trim_bos", "llama2_legacy"), ("wordlevel", "char_spaces"),
])
def test_long_documents_are_cut_at_common_boundaries_and_continued(tokenizer_zoo, text_tools, teacher_name,
                                                                   student_name):
    teacher, student = tokenizer_zoo[teacher_name], tokenizer_zoo[student_name]
    rng = random.Random(3)
    text = " ".join(text_tools.random_text(rng) for _ in range(12))
    whole = segment_document(text, teacher, student, max_length=100_000)
    assert len(whole) == 1
    assert whole[0].teacher_input_ids == teacher(text)["input_ids"]
    assert whole[0].student_input_ids == student(text)["input_ids"]
    assert (whole[0].teacher_segment_ids, whole[0].student_segment_ids) == segment_ids(text, teacher, student)
    for max_length in (6, 9, 17, 40):
        stats = SegmentationStats()
        examples = segment_document(text, teacher, student, max_length=max_length, stats=stats)
        assert stats.examples == len(examples) >= 2 and stats.documents == 1
        assert_chunks_cover_document(text, teacher, student, examples, max_length, stats)
    assert stats.skipped_segments == 0  # at 40 tokens no segment is too long: the whole text is kept


def test_over_long_single_segment_is_skipped_and_counted(text_tools):
    """One word is a single token for the word-level student but 30 characters for the teacher."""
    long_word = "a" * 30
    text = f"hello {long_word} world hello"
    corpus = [f"hello {long_word} world"] * 3
    teacher = text_tools.build("char_spaces", corpus, 1)
    student = text_tools.build("wordlevel", corpus, 50)
    stats = SegmentationStats()
    examples = segment_document(text, teacher, student, max_length=8, stats=stats)
    assert stats.skipped_segments == 1
    kept = [teacher.convert_ids_to_tokens(e.teacher_input_ids) for e in examples]
    # the space before the long word belongs to its segment (spaces join the following word)
    assert "".join("".join(k) for k in kept) == "hello world hello"
    assert_chunks_cover_document(text, teacher, student, examples, 8, stats)


def test_segment_document_counts_skipped_documents(tokenizer_zoo):
    teacher, student = tokenizer_zoo["llama3"], tokenizer_zoo["llama2"]
    stats = SegmentationStats()
    for doc in [None, 5, "", "   \n", "hello world"]:
        segment_document(doc, teacher, student, max_length=32, stats=stats)
    assert (stats.documents, stats.examples, stats.skipped_not_text, stats.skipped_empty) == (5, 1, 2, 2)
    assert stats.skipped_documents == 4
    merged = SegmentationStats()
    merged.update(stats)
    merged.update(stats)
    assert merged.as_dict()["documents"] == 10 and "5 documents" in stats.summary()


def test_segment_document_max_length_too_small_for_specials(tokenizer_zoo):
    teacher, student = tokenizer_zoo["mistral_eos"], tokenizer_zoo["llama3"]  # BOS+EOS, BOS
    assert len(segment_document("hello world", teacher, student, max_length=3)) >= 1
    with pytest.raises(ValueError, match="max_length=2"):
        segment_document("hello world", teacher, student, max_length=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_length"):
            segment_document("hello world", teacher, student, max_length=bad)


def test_special_token_inside_a_long_document_stays_in_its_chunk(tokenizer_zoo):
    teacher, student = tokenizer_zoo["llama3"], tokenizer_zoo["char_spaces"]
    text = "hello <s> world " * 6
    for max_length in (5, 12):
        stats = SegmentationStats()
        examples = segment_document(text, teacher, student, max_length=max_length, stats=stats)
        assert_chunks_cover_document(text, teacher, student, examples, max_length, stats)
