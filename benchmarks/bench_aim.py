"""MATT performance benchmark: the AIM loss and one training step against their cost floors.

    python benchmarks/bench_aim.py                 # everything (make bench), ~10-20 min on 2 CPU cores
    python benchmarks/bench_aim.py --quick         # small sizes, a smoke check of the script itself
    python benchmarks/bench_aim.py --parts loss    # only part 1

Every measurement runs in a fresh spawned process, so "peak memory" is that configuration's own
high-water mark: CUDA `max_memory_allocated` on a GPU, else the growth of the process's peak RSS
over its resident size right before the measured call (inputs and models already built; on Linux the
high-water mark is reset there, so a peak reached while building them does not count). Timings
are medians over repeats after a warm-up. Results are reported as ratios within this one run — the
machines are noisy, absolute numbers are only indicative — and written as markdown + JSON to
`bench_results/`.

Parts:
1. AIM loss alone (forward + backward): full AIM (`aim`, chunked Gram form), AIM* and the naive
   materialising reference, for L in {128, 256, 512, 1024}, with the attention shapes of
   SmolLM2-135M (9 heads, 3 KV heads, head dim 64) and Gemma 3 270M (4 heads, 1 KV head, dim 256).
2. One training step on SmolLM2-135M's architecture (random weights: cost does not depend on them),
   n_layers=10, batch 4, L=256, student vocabulary 16K: the MATT step (the real `matt.trainer.train`
   loop, data loading included), the floor (teacher forward + truncated student forward/backward
   with a trivial loss, SDPA everywhere), a reference-style step (eager attention with attention
   outputs at every layer + naive AIM, as the original library does) and a full-depth NTP step.
3. Tokens per second and peak RSS of each step; the MATT step in fp32 and under bf16 autocast
   (loss difference reported), which decides the CPU precision default.
4. (`ntp`) The NTP-fitted LM head on Gemma 3 270M shapes (random weights, vocabulary 262,144 + 8,192
   new rows, shared rows frozen): the `matt.trainer.train` step with the head vs AIM only, and the
   head term alone — chunked `lm_head_cross_entropy` vs full logits + `F.cross_entropy` — in time
   and peak memory at two vocabulary sizes.
5. (`rss`) Resident memory at steps 20, 100 and 200 of a SmolLM2-135M transfer (real weights from
   $MATT_ASSETS; skipped without them).
6. (`ops`) Operators per AIM loss call (forward + backward) counted with torch.profiler, and CUDA
   kernels on a GPU.
7. (`eval`) Evaluation throughput: bits per byte, multiple choice and greedy generation of
   `matt.evaluation` against a plain batched forward over the same tokens, SmolLM2-135M and Gemma 3
   270M shapes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_SHAPES = {  # name: (query heads, kv heads, head dim)
    "smollm2_135m": (9, 3, 64),
    "gemma3_270m": (4, 1, 256),
}
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
STUDENT_VOCAB = 16384
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, max_position_embeddings=32768, tie_word_embeddings=True)
GEMMA3_NEW_ROWS = 8192
"""New (trainable) rows of the extended Gemma 3 vocabulary (`demo_gemma3`'s tokenizer.num_new_tokens)."""
NAIVE_LIMIT_BYTES = 6 * 2**30
"""Skip the naive reference where its (B,H,S,L,D) tensors alone would exceed this."""


# ------------------------------------------------------------------------------------------------
# measurement helpers (run inside the worker process)
# ------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> bool:
    """Linux: reset the process's resident high-water mark (VmHWM), so that a peak reached while the
    inputs were built does not count as the measured call's. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakMemory:
    """Extra memory at the high-water mark of the block (CUDA allocator, else peak RSS growth)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.hwm = _reset_peak_rss()
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.extra = max(0, (_vm_hwm_bytes() if self.hwm else _peak_rss_bytes()) - self.start)
        return False


def _timed(fn, repeats: int, device: str) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _partition(total: int, parts: int, rng: random.Random) -> list[int]:
    """`parts` positive sizes summing to `total`."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def _segment_ids(lengths: list[int], n_segments: int, lead: int, rng: random.Random):
    """(B, L) ids: `lead` special tokens (-100), then n_segments segments filling the rest."""
    import torch

    rows = []
    for length in lengths:
        sizes = _partition(length - lead, n_segments, rng)
        rows.append([-100] * lead + [k for k, size in enumerate(sizes) for _ in range(size)])
    return torch.tensor(rows)


# ------------------------------------------------------------------------------------------------
# part 1: the loss alone
# ------------------------------------------------------------------------------------------------
def loss_worker(impl: str, shape: str, length: int, batch: int, repeats: int, device: str,
                measure: str = "both") -> dict:
    import torch

    from matt.objectives import aim_loss, naive_aim_loss

    torch.manual_seed(0)
    rng = random.Random(0)
    heads, kv_heads, dim = HEAD_SHAPES[shape]
    n_segments = length // 2
    student_length = int(length * 0.8)

    def side(seq_len: int, lead: int, grad: bool, segments: int = n_segments):
        logits = torch.randn(batch, heads, seq_len, seq_len, device=device)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        kv = torch.randn(batch, kv_heads, seq_len, dim, device=device)
        seg = _segment_ids([seq_len] * batch, segments, lead, rng).to(device)
        return attn.requires_grad_(grad), kv.requires_grad_(grad), seg

    reps = heads // kv_heads
    fn = naive_aim_loss if impl == "naive" else aim_loss
    variant = "aim" if impl == "naive" else impl

    def step(t_attn, t_kv, t_seg, s_attn, s_kv, s_seg):
        s_values = s_kv.repeat_interleave(reps, dim=1)
        value = fn(t_attn, t_kv.repeat_interleave(reps, dim=1), t_seg, s_attn, s_values, s_seg, impl=variant)
        value.backward()
        s_attn.grad = s_kv.grad = None
        return value

    # a tiny call first: lazy initialisation inside torch must not count as the loss's memory
    step(*side(8, 1, False, 4), *side(8, 0, True, 4))
    t_attn, t_kv, t_seg = side(length, 1, False)
    s_attn, s_kv, s_seg = side(student_length, 0, True)
    inputs_ = (t_attn, t_kv, t_seg, s_attn, s_kv, s_seg)

    inputs = sum(t.numel() * t.element_size() for t in (t_attn, t_kv, s_attn, s_kv))
    extra = seconds = None
    if measure in ("memory", "both"):
        with PeakMemory(device) as memory:
            value = step(*inputs_)
        extra = memory.extra / 2**20
    else:
        value = step(*inputs_)  # warm-up
    if measure in ("time", "both"):
        seconds = _timed(lambda: step(*inputs_), repeats, device)
    return {"impl": impl, "shape": shape, "L": length, "S": n_segments, "batch": batch, "seconds": seconds,
            "peak_extra_mb": extra, "inputs_mb": inputs / 2**20, "loss": value.detach().item()}


def _ratio(numerator: float, denominator: float, floor: float = 1.0, digits: int = 2) -> str:
    """`a/b` as text; '–' when the denominator is below the measurement floor (noise, not a ratio)."""
    return f"{numerator / denominator:.{digits}f}x" if denominator >= floor else "–"


def naive_bytes(shape: str, length: int, batch: int) -> int:
    heads, _, dim = HEAD_SHAPES[shape]
    n_segments = length // 2
    return 4 * batch * heads * n_segments * dim * (length + n_segments)  # weighted (S·L·D) + s (S·S·D)


# ------------------------------------------------------------------------------------------------
# part 2/3: one training step
# ------------------------------------------------------------------------------------------------
def _smollm2(n_layers: int | None, attn: str, vocab: int = STUDENT_VOCAB):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**SMOLLM2_135M, "vocab_size": vocab})
    if n_layers is not None:
        config.num_hidden_layers = n_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()


def _synthetic_examples(n: int, length: int, student_length: int, n_segments: int, seed: int = 0,
                        teacher_vocab: int = SMOLLM2_135M["vocab_size"], student_vocab: int = STUDENT_VOCAB):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        t_seg = _segment_ids([length], n_segments, 1, rng)[0].tolist()
        s_seg = _segment_ids([student_length], n_segments, 0, rng)[0].tolist()
        examples.append({
            "teacher_input_ids": [1] + [rng.randrange(2, teacher_vocab) for _ in range(length - 1)],
            "teacher_segment_ids": t_seg,
            "student_input_ids": [rng.randrange(2, student_vocab) for _ in range(student_length)],
            "student_segment_ids": s_seg,
        })
    return examples


def step_worker(kind: str, n_layers: int, batch: int, length: int, steps: int, warmup: int,
                precision: str, device: str) -> dict:
    import torch

    torch.manual_seed(0)
    n_segments = length // 2
    tokens_per_step = batch * length  # student tokens
    rss_before = _rss_bytes()

    if kind == "matt":
        import datasets

        from matt.config import MATTConfig
        from matt.batches import AIMCollator
        from matt.modeling import LlamaForAIM
        from matt.trainer import train

        teacher = LlamaForAIM(_smollm2(n_layers, "sdpa", SMOLLM2_135M["vocab_size"]), n_layers=n_layers,
                              frozen_embeddings_mask=torch.ones(SMOLLM2_135M["vocab_size"], dtype=torch.bool))
        student = LlamaForAIM(_smollm2(n_layers, "sdpa"), n_layers=n_layers)
        data = datasets.Dataset.from_list(_synthetic_examples(batch * (steps + warmup), length, length, n_segments))
        stamps: list[float] = []
        losses: list[float] = []
        config = MATTConfig(max_steps=steps + warmup, batch_size=batch, lr=1e-3, shuffle=False, log_every_n_steps=1,
                            progress_bar=False, precision=precision, cpu=device == "cpu",
                            output_embeddings="keep_init")

        def record(metrics, step):
            stamps.append(metrics["elapsed_s"])
            losses.append(metrics["aim_loss"])

        train(config, teacher, student, data, AIMCollator(0, 0), log_fns=[record])
        seconds = (stamps[-1] - stamps[warmup - 1]) / steps
        return {"kind": kind, "precision": precision, "seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
                "peak_rss_mb": _peak_rss_bytes() / 2**20, "model_rss_mb": rss_before / 2**20,
                "first_loss": losses[0], "losses": losses}

    # hand-written baselines: the same batch shape, only input embeddings train
    ids_t = torch.randint(2, SMOLLM2_135M["vocab_size"], (batch, length), device=device)
    ids_s = torch.randint(2, STUDENT_VOCAB, (batch, length), device=device)

    if kind == "floor":
        teacher = _smollm2(n_layers, "sdpa", SMOLLM2_135M["vocab_size"]).to(device).requires_grad_(False)
        student = _smollm2(n_layers, "sdpa").to(device).requires_grad_(False)
    elif kind == "reference":
        teacher = _smollm2(n_layers, "eager", SMOLLM2_135M["vocab_size"]).to(device).requires_grad_(False)
        student = _smollm2(n_layers, "eager").to(device).requires_grad_(False)
    elif kind == "ntp":
        teacher, student = None, _smollm2(None, "sdpa").to(device).requires_grad_(False)
    else:
        raise ValueError(kind)
    embeddings = student.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    optimizer = torch.optim.AdamW([embeddings], lr=1e-3, weight_decay=0.0)

    values = {}
    if kind == "reference":
        from matt.objectives import naive_aim_loss

        heads, kv_heads, _ = HEAD_SHAPES["smollm2_135m"]

        def hook(name):
            def fn(module, inputs, out):  # (B, L, KV·D) -> (B, H, L, D), KV heads repeated
                b, seq, _ = out.shape
                values[name] = out.view(b, seq, kv_heads, -1).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
            return fn

        teacher.model.layers[-1].self_attn.v_proj.register_forward_hook(hook("teacher"))
        student.model.layers[-1].self_attn.v_proj.register_forward_hook(hook("student"))
        rng = random.Random(0)
        t_seg = _segment_ids([length] * batch, n_segments, 1, rng)
        s_seg = _segment_ids([length] * batch, n_segments, 0, rng)

    def step():
        if kind == "floor":
            with torch.inference_mode():
                teacher.model(input_ids=ids_t, use_cache=False)
            hidden = student.model(input_ids=ids_s, use_cache=False).last_hidden_state
            loss = hidden.float().pow(2).mean()
        elif kind == "reference":
            with torch.no_grad():
                t_out = teacher.model(input_ids=ids_t, use_cache=False, output_attentions=True)
            s_out = student.model(input_ids=ids_s, use_cache=False, output_attentions=True)
            loss = naive_aim_loss(t_out.attentions[-1], values["teacher"], t_seg, s_out.attentions[-1],
                                  values["student"], s_seg)
        else:  # full-depth next-token prediction
            loss = student(input_ids=ids_s, labels=ids_s, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([embeddings], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    for _ in range(warmup):
        step()
    seconds = _timed(step, steps, device)
    return {"kind": kind, "precision": "32", "seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
            "peak_rss_mb": _peak_rss_bytes() / 2**20, "model_rss_mb": rss_before / 2**20}


# ------------------------------------------------------------------------------------------------
# part 4: the NTP-fitted LM head on a 262K vocabulary (Gemma 3 270M shapes)
# ------------------------------------------------------------------------------------------------
def _gemma3(vocab: int):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**GEMMA3_270M, "vocab_size": vocab})).eval()


def _autocast_bf16(precision: str, device: str) -> bool:
    from matt.config import resolve_mixed_precision

    return resolve_mixed_precision(precision, cpu=device == "cpu") == "bf16"


def gemma_step_worker(kind: str, batch: int, length: int, steps: int, warmup: int, precision: str,
                      device: str, teacher_vocab: int = GEMMA3_270M["vocab_size"]) -> dict:
    """One `matt.trainer.train` step on Gemma 3 270M shapes: AIM only, or AIM + the NTP-fitted head
    (`output_embeddings=ntp`, `ntp_scope=head`; the 262,144 shared rows frozen, 8,192 new rows train):
    `ntp_head` on every token, `ntp_head_<k>` on k sampled tokens per step (`ntp_max_tokens`)."""
    import datasets
    import torch

    from matt.config import MATTConfig
    from matt.batches import AIMCollator
    from matt.modeling import Gemma3ForAIM
    from matt.trainer import train

    student_vocab = teacher_vocab + GEMMA3_NEW_ROWS
    with_ntp = kind.startswith("ntp_head")
    max_tokens = int(kind.rsplit("_", 1)[1]) if kind.startswith("ntp_head_") else None
    teacher = Gemma3ForAIM(_gemma3(teacher_vocab), n_layers=6,
                           frozen_embeddings_mask=torch.ones(teacher_vocab, dtype=torch.bool))
    frozen = torch.zeros(student_vocab, dtype=torch.bool)
    frozen[:teacher_vocab] = True
    student = Gemma3ForAIM(_gemma3(student_vocab), n_layers=6, frozen_embeddings_mask=frozen, with_ntp=with_ntp)
    data = datasets.Dataset.from_list(_synthetic_examples(batch * (steps + warmup), length, length, length // 2,
                                                          teacher_vocab=teacher_vocab, student_vocab=student_vocab))
    stamps: list[float] = []
    config = MATTConfig(max_steps=steps + warmup, batch_size=batch, lr=1e-3, shuffle=False, log_every_n_steps=1,
                        progress_bar=False, precision=precision, cpu=device == "cpu", with_ntp=with_ntp,
                        output_embeddings="ntp" if with_ntp else "keep_init", ntp_scope="head" if with_ntp else "all",
                        ntp_max_tokens=max_tokens)
    train(config, teacher, student, data, AIMCollator(0, 0), log_fns=[lambda metrics, step: stamps.append(metrics["elapsed_s"])])
    seconds = (stamps[-1] - stamps[warmup - 1]) / steps
    return {"kind": kind, "seconds": seconds, "tokens_per_s": batch * length / seconds,
            "peak_rss_mb": _peak_rss_bytes() / 2**20}


def head_worker(impl: str, vocab: int, tokens: int, detach: bool, repeats: int, precision: str, device: str,
                measure: str = "both") -> dict:
    """The NTP head term alone (forward + backward) on `tokens` hidden states of Gemma 3's width:
    `chunked` (`lm_head_cross_entropy`) or `plain` (full logits from the head + F.cross_entropy)."""
    import torch
    import torch.nn.functional as F

    from matt.modeling import PartlyFrozenEmbedding
    from matt.modeling.embeddings import EmbeddingLMHead
    from matt.modeling.lm_head_loss import lm_head_cross_entropy

    torch.manual_seed(0)
    dim, rows = GEMMA3_270M["hidden_size"], vocab + GEMMA3_NEW_ROWS
    frozen = torch.zeros(rows, dtype=torch.bool)
    frozen[:vocab] = True
    head = EmbeddingLMHead(PartlyFrozenEmbedding(torch.randn(rows, dim) * 0.02, frozen)).to(device)
    bf16 = _autocast_bf16(precision, device)

    def inputs(n):
        hidden = torch.randn(n, dim, device=device).requires_grad_(not detach)
        return hidden, torch.randint(0, rows, (n,), device=device)

    def step(hidden, labels):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if impl == "chunked":
                loss = lm_head_cross_entropy(head, hidden, labels)
            else:
                loss = F.cross_entropy(head(hidden).float(), labels)
        loss.backward()
        head.table.trainable.grad = hidden.grad = None
        return loss.item()

    step(*inputs(8))  # lazy initialisation inside torch is not the head's memory
    hidden, labels = inputs(tokens)
    extra = seconds = None
    if measure in ("memory", "both"):
        with PeakMemory(device) as memory:
            value = step(hidden, labels)
        extra = memory.extra / 2**20
    else:
        value = step(hidden, labels)
    if measure in ("time", "both"):
        seconds = _timed(lambda: step(hidden, labels), repeats, device)
    return {"impl": impl, "vocab": vocab, "rows": rows, "tokens": tokens, "detach": detach, "bf16": bf16,
            "seconds": seconds, "peak_extra_mb": extra, "loss": value}


# ------------------------------------------------------------------------------------------------
# part 5: resident memory over a 200-step SmolLM2 transfer
# ------------------------------------------------------------------------------------------------
def rss_worker(steps: int, marks: tuple[int, ...], batch: int, max_length: int, precision: str, device: str,
               assets: str) -> dict:
    """`matt.trainer.train` on the real SmolLM2-135M (teacher) and a copy with a 16K vocabulary (student,
    half its rows frozen), demo-like: AIM at layer 10 + NTP-fitted head (`ntp_scope=head`); sequences of
    varying length (64..max_length) as real documents give. Records the resident set at `marks`."""
    import datasets
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from matt.config import MATTConfig
    from matt.batches import AIMCollator
    from matt.modeling import LlamaForAIM
    from matt.trainer import train

    path = Path(assets) / "smollm2_135m"
    teacher_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    student_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    student_model.resize_token_embeddings(STUDENT_VOCAB)
    vocab = teacher_model.config.vocab_size
    teacher = LlamaForAIM(teacher_model, n_layers=10, frozen_embeddings_mask=torch.ones(vocab, dtype=torch.bool))
    frozen = torch.zeros(STUDENT_VOCAB, dtype=torch.bool)
    frozen[:STUDENT_VOCAB // 2] = True
    student = LlamaForAIM(student_model, n_layers=10, frozen_embeddings_mask=frozen, with_ntp=True)
    rng = random.Random(0)
    examples = []
    for _ in range(batch * steps):
        length = rng.randint(64, max_length)
        examples += _synthetic_examples(1, length, int(length * rng.uniform(0.5, 0.9)), rng.randint(4, length // 4),
                                        seed=rng.randrange(2**31), teacher_vocab=vocab)
    data = datasets.Dataset.from_list(examples)
    config = MATTConfig(max_steps=steps, batch_size=batch, lr=3e-4, log_every_n_steps=1, progress_bar=False,
                        precision=precision, cpu=device == "cpu", with_ntp=True, output_embeddings="ntp",
                        ntp_scope="head", shuffle=False)
    process, rss = psutil.Process(), {}

    def record(metrics, step):
        if step in marks:
            rss[step] = process.memory_info().rss / 2**20

    train(config, teacher, student, data, AIMCollator(2, 0), log_fns=[record])
    return {"rss_mb": rss, "steps": steps}


def part_rss(args, device: str) -> tuple[list[dict], list[str]]:
    import os

    assets = os.environ.get("MATT_ASSETS", str(ROOT / "assets"))
    if not (Path(assets) / "smollm2_135m").exists():
        return [], ["## 5. Resident memory over a transfer", "",
                    f"Skipped: no SmolLM2-135M asset under {assets} (`make assets` or set MATT_ASSETS).", ""]
    steps, marks = (30, (5, 30)) if args.quick else (200, (20, 100, 200))
    row = run_isolated(rss_worker, steps=steps, marks=marks, batch=4, max_length=256, precision=args.precision,
                       device=device, assets=assets)
    rss = {int(k): v for k, v in row["rss_mb"].items()}
    first, last = rss[marks[0]], rss[marks[-1]]
    print(f"  rss: {rss}", flush=True)
    lines = ["## 5. Resident memory over a transfer", "",
             f"SmolLM2-135M (real weights) → 16K vocabulary, AIM at layer 10 + NTP-fitted head, batch 4, sequences of "
             f"64-256 tokens, {steps} steps: RSS " + ", ".join(f"{v:.0f} MB at step {k}" for k, v in sorted(rss.items()))
             + f"; step {marks[-1]} / step {marks[0]} = {last / first:.3f} (target ≤ 1.05).", ""]
    return [row], lines


# ------------------------------------------------------------------------------------------------
# part 6: operations per full-AIM loss call
# ------------------------------------------------------------------------------------------------
def ops_worker(impl: str, shape: str, length: int, batch: int, device: str) -> dict:
    """Operators (and on CUDA, kernels) one loss call runs, forward + backward, by torch.profiler:
    top-level `aten::` operators (those not called from inside another aten operator)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from matt.objectives import aim_loss

    torch.manual_seed(0)
    rng = random.Random(0)
    heads, kv_heads, dim = HEAD_SHAPES[shape]
    n_segments = length // 2

    def side(seq_len: int, lead: int, grad: bool):
        logits = torch.randn(batch, heads, seq_len, seq_len, device=device)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        values = torch.randn(batch, heads, seq_len, dim, device=device)
        seg = _segment_ids([seq_len] * batch, n_segments, lead, rng).to(device)
        return attn.requires_grad_(grad), values.requires_grad_(grad), seg

    teacher, student = side(length, 1, False), side(int(length * 0.8), 0, True)

    def call():
        aim_loss(*teacher, *student, impl=impl).backward()
        student[0].grad = student[1].grad = None

    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::")
              and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if device == "cuda" else None
    return {"impl": impl, "shape": shape, "L": length, "batch": batch, "ops": ops, "kernels": kernels}


def part_ops(args, device: str) -> tuple[list[dict], list[str]]:
    lengths = [64] if args.quick else [int(x) for x in args.lengths.split(",")]
    rows = [ops_worker(impl, shape, length, args.batch, device)
            for shape in HEAD_SHAPES for length in lengths for impl in ("aim", "aim_star")]
    lines = ["## 6. Operations per AIM loss call (forward + backward, torch.profiler)", "",
             "| heads | L | full AIM aten ops | AIM* aten ops |" + (" full AIM kernels | AIM* kernels |" if device == "cuda" else ""),
             "|---|---|---|---|" + ("---|---|" if device == "cuda" else "")]
    for shape in HEAD_SHAPES:
        for length in lengths:
            by = {r["impl"]: r for r in rows if r["shape"] == shape and r["L"] == length}
            line = f"| {shape} | {length} | {by['aim']['ops']} | {by['aim_star']['ops']} |"
            if device == "cuda":
                line += f" {by['aim']['kernels']} | {by['aim_star']['kernels']} |"
            lines.append(line)
    lines += ["", f"Batch {args.batch}; top-level `aten::` operators (what Python dispatches, views included; on a GPU "
              "the kernels columns count launches).", ""]
    return rows, lines


# ------------------------------------------------------------------------------------------------
# part 7: evaluation throughput (matt.evaluation) against a plain batched forward
# ------------------------------------------------------------------------------------------------
EVAL_MODELS = {  # name: (transformers config class, config) - random weights: cost does not depend on them
    "smollm2_135m": ("LlamaConfig", SMOLLM2_135M),
    "gemma3_270m": ("Gemma3TextConfig", GEMMA3_270M),
}


def _eval_model(name: str):
    import torch
    import transformers

    class_name, config = EVAL_MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**config))
    return model.float().eval()


def _eval_workload(kind: str, vocab: int, quick: bool, seed: int = 0):
    """Token ids shaped like the demo's evaluation: `choice` = items of a ~3-sentence context and 4
    choices of a sentence each; `bpb` = 512-token windows of held-out documents; `generation` =
    ~100-token prompts continued by 32 tokens (as many prompts as `eval.generation.num_items`'s default,
    decoded in batches of its `batch_size` default)."""
    from matt.pipeline.config import GenerationEvalConfig

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    if kind == "choice":
        items = 4 if quick else 16
        return [(ids(rng.randint(90, 160)), [ids(rng.randint(20, 50)) for _ in range(4)]) for _ in range(items)]
    if kind == "bpb":
        return [ids(512 if not quick else 128) for _ in range(2 if quick else 4)]
    return [ids(rng.randint(80, 120)) for _ in range(2 if quick else GenerationEvalConfig.num_items)]


def eval_worker(model_name: str, kind: str, quick: bool, device: str, repeats: int = 1) -> dict:
    """Seconds of one evaluation pass (`kind`) and of a plain batched forward (`model(ids).logits`,
    batches of 8 sorted by length) over the same token sequences; tokens/s of both."""
    import torch

    from matt.evaluation.generation import greedy_continuations
    from matt.pipeline.config import GenerationEvalConfig
    from matt.evaluation.scoring import score_continuations, token_nll

    torch.set_grad_enabled(False)
    model = _eval_model(model_name).to(device)
    vocab = model.config.vocab_size
    work = _eval_workload(kind, vocab, quick)
    new_tokens = 32
    if kind == "choice":
        sequences = [context + option for context, options in work for option in options]
        processed = sum(len(c) + sum(len(o) for o in opts) for c, opts in work)
        run = lambda: score_continuations(model, [c for c, _ in work], [o for _, o in work],  # noqa: E731
                                          batch_size=8, device=device, progress=False)
    elif kind == "bpb":
        sequences = work
        processed = sum(len(s) for s in work)
        run = lambda: token_nll(model, work, [1] * len(work), batch_size=4, device=device, progress=False)  # noqa: E731
    else:
        class Ids:  # a tokenizer stand-in: the prompts are already token ids
            bos_token_id, eos_token_id, pad_token_id = 1, None, 0

            def __call__(self, texts, add_special_tokens=False):
                return {"input_ids": [work[int(t)] for t in texts]}

            def decode(self, ids, skip_special_tokens=True):
                return " ".join(map(str, ids))

        sequences = [[1, *p] + [0] * new_tokens for p in work]
        processed = sum(len(s) for s in sequences)
        run = lambda: greedy_continuations(model, Ids(), [str(i) for i in range(len(work))],  # noqa: E731
                                           max_new_tokens=new_tokens, batch_size=GenerationEvalConfig.batch_size,
                                           device=device, progress=False)

    def plain():
        order = sorted(sequences, key=len, reverse=True)
        for start in range(0, len(order), 8):
            batch = order[start:start + 8]
            width = len(batch[0])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(batch):
                input_ids[row, :len(seq)] = torch.as_tensor(seq)
                mask[row, :len(seq)] = 1
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits

    tokens = sum(len(s) for s in sequences)
    model(input_ids=torch.ones(2, 16, dtype=torch.long, device=device))  # warm-up (kernels, allocator)
    times = {name: _timed(fn, repeats, device) for name, fn in (("plain", plain), ("pass", run))}
    return {"model": model_name, "kind": kind, "tokens": tokens, "processed_tokens": processed,
            "plain_s": times["plain"], "pass_s": times["pass"],
            "plain_tokens_per_s": tokens / times["plain"], "pass_tokens_per_s": tokens / times["pass"]}


def part_eval(args, device: str) -> tuple[list[dict], list[str]]:
    """Evaluation passes vs a plain batched forward over the same tokens (target: ratio >= 0.7)."""
    rows = []
    for model_name in EVAL_MODELS:
        for kind in ("bpb", "choice", "generation"):
            row = run_isolated(eval_worker, model_name=model_name, kind=kind, quick=args.quick, device=device)
            rows.append(row)
            print(f"  eval {model_name} {kind}: pass {row['pass_tokens_per_s']:.0f} tok/s, plain forward "
                  f"{row['plain_tokens_per_s']:.0f} tok/s", flush=True)
    lines = ["## 7. Evaluation throughput vs a plain batched forward over the same tokens", "",
             "| model | pass | tokens | tokens run | pass tok/s | plain forward tok/s | pass / plain |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['kind']} | {row['tokens']} | {row['processed_tokens']} "
                     f"| {row['pass_tokens_per_s']:.0f} | {row['plain_tokens_per_s']:.0f} "
                     f"| {row['pass_tokens_per_s'] / row['plain_tokens_per_s']:.2f}x |")
    lines += ["", "Random weights with the real shapes. `tokens`: the sequences a plain evaluator runs (for multiple "
              "choice every choice with its whole context; for generation prompt + 32 new tokens); `tokens run`: "
              "what the pass feeds the model (a context once for its 4 choices). plain forward = `model(ids).logits`"
              " in length-sorted batches of 8 over those sequences. Target: pass / plain >= 0.7x.", ""]
    return rows, lines


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
SPAWN = True
"""False (`--in-process`): call the workers directly (on CUDA the allocator's peak statistics already
isolate each measurement; saves a process start per measurement)."""


def measure_time_and_memory(fn, **kwargs) -> dict:
    """One measurement row: on CUDA one isolated run (the allocator isolates time and memory); on a
    CPU the peak RSS in a process with exact RSS accounting and the time in a separate normal one."""
    if kwargs["device"] == "cuda":
        return run_isolated(fn, **kwargs)
    row = run_isolated(fn, exact_rss=True, measure="memory", **kwargs)
    row["seconds"] = run_isolated(fn, measure="time", **kwargs)["seconds"]
    return row


def run_isolated(fn, *, exact_rss: bool = False, **kwargs) -> dict:
    """Run `fn(**kwargs)` in a fresh spawned process (its own memory high-water mark).

    `exact_rss`: glibc's malloc keeps freed blocks below a threshold that it raises as large blocks
    come and go, so the peak RSS would count memory that was already free; a fixed mmap threshold
    (read at process start) returns every large block to the OS on free. It also makes every
    large allocation a fresh mmap (slow), so timings are taken in a separate process without it."""
    import os

    if not SPAWN:
        import gc

        import torch

        result = fn(**kwargs)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if exact_rss:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            return pool.apply(fn, kwds=kwargs)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def part_loss(args, device: str) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["## 1. AIM loss alone (forward + backward)", ""]
    lengths = [64, 128] if args.quick else [int(x) for x in args.lengths.split(",")]
    for shape in HEAD_SHAPES:
        for length in lengths:
            for impl in ("aim", "aim_star", "naive"):
                if impl == "naive" and naive_bytes(shape, length, args.batch) > NAIVE_LIMIT_BYTES:
                    rows.append({"impl": impl, "shape": shape, "L": length, "skipped": True})
                    continue
                kwargs = dict(impl=impl, shape=shape, length=length, batch=args.batch, repeats=args.repeats,
                              device=device)
                row = measure_time_and_memory(loss_worker, **kwargs)
                rows.append(row)
                print(f"  loss {shape} L={length} {impl}: {row['seconds'] * 1e3:.1f} ms, "
                      f"+{row['peak_extra_mb']:.0f} MB", flush=True)
    lines += ["| heads | L (teacher/student) | S | full AIM ms | AIM* ms | naive ms | full AIM +MB | AIM* +MB | "
              "naive +MB | mem AIM/AIM* | mem naive/AIM | time AIM/AIM* | time naive/AIM |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in HEAD_SHAPES:
        for length in lengths:
            by = {r["impl"]: r for r in rows if r["shape"] == shape and r["L"] == length}
            full, star, naive = by["aim"], by["aim_star"], by["naive"]
            if naive.get("skipped"):
                naive_ms = naive_mb = mem_naive = time_naive = "skipped"
            else:
                naive_ms, naive_mb = f"{naive['seconds'] * 1e3:.1f}", f"{naive['peak_extra_mb']:.0f}"
                mem_naive = _ratio(naive["peak_extra_mb"], full["peak_extra_mb"], digits=1)
                time_naive = f"{naive['seconds'] / full['seconds']:.1f}x"
            heads, kv_heads, dim = HEAD_SHAPES[shape]
            lines.append(
                f"| {shape} ({heads}/{kv_heads}x{dim}) | {length}/{int(length * 0.8)} | {full['S']} "
                f"| {full['seconds'] * 1e3:.1f} | {star['seconds'] * 1e3:.1f} | {naive_ms} "
                f"| {full['peak_extra_mb']:.0f} | {star['peak_extra_mb']:.0f} | {naive_mb} "
                f"| {_ratio(full['peak_extra_mb'], star['peak_extra_mb'])} | {mem_naive} "
                f"| {full['seconds'] / star['seconds']:.2f}x | {time_naive} |")
    lines += ["", f"Batch {args.batch}; '+MB' = peak memory beyond the inputs ({'CUDA allocator' if device == 'cuda' else 'peak RSS growth'}).", ""]
    return rows, lines


def part_step(args, device: str) -> tuple[list[dict], list[str]]:
    length, batch, n_layers = (64, 2, 4) if args.quick else (256, 4, 10)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    rows = []
    kinds = [("matt", "32"), ("matt", "bf16-mixed"), ("floor", "32"), ("reference", "32"), ("ntp", "32")]
    for kind, precision in kinds:
        row = run_isolated(step_worker, kind=kind, n_layers=n_layers, batch=batch, length=length, steps=steps,
                           warmup=warmup, precision=precision, device=device)
        rows.append(row)
        print(f"  step {kind} ({precision}): {row['seconds']:.2f} s, {row['tokens_per_s']:.0f} tok/s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    by = {(r["kind"], r["precision"]): r for r in rows}
    matt = by["matt", "32"]
    lines = [f"## 2-3. One training step: SmolLM2-135M architecture, n_layers={n_layers}, batch {batch}, L={length}", "",
             "| step | s/step | tokens/s | peak RSS MB | MATT time / this |", "|---|---|---|---|---|"]
    names = {"matt": "MATT (matt.trainer.train)", "floor": "floor: teacher fwd + truncated student fwd/bwd, trivial loss",
             "reference": "reference-style: eager + attentions at every layer + naive AIM", "ntp": "NTP at full depth"}
    for (kind, precision), row in by.items():
        label = names[kind] + (" [bf16 autocast]" if precision != "32" else "")
        lines.append(f"| {label} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} "
                     f"| {matt['seconds'] / row['seconds']:.2f} |")
    bf16 = by["matt", "bf16-mixed"]
    rel = abs(bf16["first_loss"] - matt["first_loss"]) / max(abs(matt["first_loss"]), 1e-12)
    lines += ["", "Targets: MATT ≤ 1.15x floor, ≥ 2x faster than reference-style, ≤ 0.5x NTP.",
              f"MATT / floor = {matt['seconds'] / by['floor', '32']['seconds']:.2f}x; "
              f"reference / MATT = {by['reference', '32']['seconds'] / matt['seconds']:.2f}x; "
              f"MATT / NTP = {matt['seconds'] / by['ntp', '32']['seconds']:.2f}x.",
              f"bf16 autocast vs fp32 (MATT step): {matt['seconds'] / bf16['seconds']:.2f}x speed-up, "
              f"first-step AIM loss differs by {rel:.2e} (relative).", ""]
    return rows, lines


def part_ntp(args, device: str) -> tuple[list[dict], list[str]]:
    batch, length = (1, 64) if args.quick else (4, 256)
    steps, warmup = (1, 1) if args.quick else (3, 1)
    vocab = 16384 if args.quick else GEMMA3_270M["vocab_size"]
    steps_rows = []
    sampled = f"ntp_head_{batch * length // 4}"
    for kind in ("aim", "ntp_head", sampled):
        row = run_isolated(gemma_step_worker, kind=kind, batch=batch, length=length, steps=steps, warmup=warmup,
                           precision=args.precision, device=device, teacher_vocab=vocab)
        steps_rows.append(row)
        print(f"  gemma3 step {kind}: {row['seconds']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    head_rows = []
    vocabs = (8192, 32768) if args.quick else (65536, GEMMA3_270M["vocab_size"])
    for head_vocab in vocabs:
        for impl in ("chunked", "plain"):
            kwargs = dict(impl=impl, vocab=head_vocab, tokens=batch * length, detach=True, repeats=max(1, args.repeats // 2),
                          precision=args.precision, device=device)
            row = measure_time_and_memory(head_worker, **kwargs)
            head_rows.append(row)
            print(f"  head term V={head_vocab}+{GEMMA3_NEW_ROWS} {impl}: {row['seconds'] * 1e3:.0f} ms, "
                  f"+{row['peak_extra_mb']:.0f} MB", flush=True)
    aim, ntp, ntp_sampled = steps_rows
    by = {(r["vocab"], r["impl"]): r for r in head_rows}
    small, large = vocabs
    mem = "CUDA allocator" if device == "cuda" else "peak RSS growth"
    lines = [f"## 4. NTP-fitted LM head, Gemma 3 270M shapes (vocabulary {vocab:,} + {GEMMA3_NEW_ROWS:,} new rows, "
             f"batch {batch}, L={length}, AIM at layer 6 of 18, {'bf16 autocast' if _autocast_bf16(args.precision, device) else 'float32'})",
             "", "| step (`matt.trainer.train`) | s/step | peak RSS MB | / AIM-only |", "|---|---|---|---|"]
    for row, label in ((aim, "AIM only (`output_embeddings=keep_init`)"),
                       (ntp, "AIM + NTP-fitted head (`output_embeddings=ntp`, `ntp_scope=head`)"),
                       (ntp_sampled, f"the same, head term on {batch * length // 4} sampled tokens "
                                     f"(`objective.ntp_max_tokens={batch * length // 4}`)")):
        lines.append(f"| {label} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | {row['seconds'] / aim['seconds']:.2f}x |")
    lines += ["", f"The head term alone (forward + backward, {batch * length} tokens, width {GEMMA3_270M['hidden_size']}, "
              f"{GEMMA3_NEW_ROWS:,} trainable rows, detached head input as with `ntp_scope=head`): chunked "
              "`lm_head_cross_entropy` vs full logits + `F.cross_entropy`.", "",
              "| frozen rows | chunked ms | plain ms | plain / chunked time | chunked +MB | plain +MB |",
              "|---|---|---|---|---|---|"]
    for head_vocab in vocabs:
        c, p = by[head_vocab, "chunked"], by[head_vocab, "plain"]
        lines.append(f"| {head_vocab:,} | {c['seconds'] * 1e3:.0f} | {p['seconds'] * 1e3:.0f} | "
                     f"{p['seconds'] / c['seconds']:.2f}x | {c['peak_extra_mb']:.0f} | {p['peak_extra_mb']:.0f} |")
    lines += ["", f"Targets: NTP-head step ≤ 2x the AIM-only step — measured {ntp['seconds'] / aim['seconds']:.2f}x "
              f"on every token, {ntp_sampled['seconds'] / aim['seconds']:.2f}x on a quarter of them; "
              f"head-term peak memory independent of the vocabulary — chunked {by[large, 'chunked']['peak_extra_mb']:.0f} MB "
              f"at {large:,} vs {by[small, 'chunked']['peak_extra_mb']:.0f} MB at {small:,} rows "
              f"(plain: {by[large, 'plain']['peak_extra_mb']:.0f} vs {by[small, 'plain']['peak_extra_mb']:.0f} MB). "
              f"'+MB' = {mem} during the call.", ""]
    return steps_rows + head_rows, lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="loss,step,ntp,rss,ops,eval", help="comma-separated: loss, step, ntp, rss, ops, eval")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--batch", type=int, default=1, help="batch size of part 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per variant (part 2)")
    parser.add_argument("--lengths", default="128,256,512,1024", help="teacher lengths of parts loss and ops")
    parser.add_argument("--in-process", action="store_true",
                        help="no process per measurement (for CUDA: peak memory comes from the allocator)")
    parser.add_argument("--precision", default="auto", help="precision of parts ntp (MATTConfig.precision)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.in_process:
        if device != "cuda":
            parser.error("--in-process measures peak memory with the CUDA allocator: use it with --device cuda")
        global SPAWN
        SPAWN = False
    header = [f"# MATT benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"Device: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}"
              f" ({device}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"command: `python benchmarks/bench_aim.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    results, lines = {}, list(header)
    parts = args.parts.split(",")
    part_functions = {"loss": part_loss, "step": part_step, "ntp": part_ntp, "rss": part_rss, "ops": part_ops,
                      "eval": part_eval}
    unknown = [part for part in parts if part not in part_functions]
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; choose from {list(part_functions)}")
    for name, part_function in part_functions.items():
        if name in parts:
            results[name], part_lines = part_function(args, device)
            lines += part_lines
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quick" if args.quick else "bench"
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"written to {out / stem}.md / .json")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
