"""AIM adapters: capture vs HF eager attention, truncation/early stop, partly frozen embeddings,
output modes, clear errors, and a tiny optimisation sanity check — for all five families."""

from __future__ import annotations

import pytest
import torch
from devices import CUDA
from torch import nn

from matt.modeling import (
    AIMOutput,
    Gemma3ForAIM,
    GPTNeoXForAIM,
    LlamaForAIM,
    MistralForAIM,
    PartlyFrozenEmbedding,
    PreTrainedModelForAIM,
    Qwen3ForAIM,
    adapter_for,
    check_compatible,
    check_vocab,
)
from matt.modeling import registry
from matt.modeling.embeddings import EmbeddingLMHead
from matt.modeling.registry import family_of, register_adapter
from matt.tiny import FAMILIES, tiny_config, tiny_model
from model_helpers import padded_batch as _padded_batch

VOCAB = 97
TIED = {"llama", "gemma3"}
ADAPTERS = {"llama": LlamaForAIM, "gemma3": Gemma3ForAIM, "mistral": MistralForAIM,
            "qwen3": Qwen3ForAIM, "gpt_neox": GPTNeoXForAIM}
# Small sliding windows so that L=20 is longer than the window; Gemma alternates layer types.
OVERRIDES = {
    "gemma3": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2),
    "mistral": dict(sliding_window=6),
}


def make_model(family: str, seed: int = 0, **overrides):
    return tiny_model(family, VOCAB, seed=seed, **{**OVERRIDES.get(family, {}), **overrides})


def padded_batch(seed: int = 0, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    return _padded_batch(VOCAB, seed, length)


def record_values(model: nn.Module, layer: int, recorded: dict):
    """Hook the layer's raw value projection; stores it as (B, H, L, D) with KV heads repeated
    like HF's repeat_kv (each KV head serves consecutive query heads)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = config.hidden_size // heads
    if config.model_type == "gpt_neox":
        proj = model.gpt_neox.layers[layer].attention.query_key_value

        def to_values(out):  # fused (B, L, H, 3·D) -> the value third
            return out.view(*out.shape[:2], heads, 3 * head_dim)[..., 2 * head_dim:]
    else:
        proj = model.model.layers[layer].self_attn.v_proj

        def to_values(out):
            return out.view(*out.shape[:2], kv_heads, head_dim)

    def hook(module, inputs, out):
        recorded["values"] = to_values(out).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)

    return proj.register_forward_hook(hook)


def hf_eager_reference(model, ids, mask, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probs from HF's own eager attention on the full model, and that run's values."""
    recorded: dict = {}
    handle = record_values(model, layer, recorded)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        handle.remove()
        model.set_attn_implementation(previous)
    return out.attentions[layer], recorded["values"]


# ---------------------------------------------------------------------------------------------
# capture equals HF eager
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [1, 2])
def test_capture_matches_hf_eager_attention_and_values(family, n_layers):
    model = make_model(family)
    ids, mask = padded_batch()
    ref_probs, ref_values = hf_eager_reference(model, ids, mask, layer=n_layers - 1)

    adapter = adapter_for(model)(model, n_layers=n_layers, copy=True)
    own: dict = {}
    handle = record_values(adapter.causal_lm, n_layers - 1, own)
    with torch.no_grad():
        out = adapter(ids, mask)
    handle.remove()

    assert isinstance(out, AIMOutput) and out.logits is None
    assert out.attn_probs.dtype == torch.float32 and out.values.dtype == torch.float32
    assert out.attn_probs.shape == (3, 4, 20, 20) and out.values.shape == (3, 4, 20, 16)
    torch.testing.assert_close(out.attn_probs, ref_probs, atol=2e-6, rtol=1e-5)
    assert torch.equal(out.values, own["values"])  # exactly the layer's value projection
    torch.testing.assert_close(out.values, ref_values, atol=2e-6, rtol=1e-5)  # padding tokens too
    # the masks really are in there: nothing on future keys, nothing on padding keys
    future = torch.triu(torch.ones(20, 20, dtype=torch.bool), diagonal=1)
    real_queries = mask.bool()[:, None, :, None]
    assert out.attn_probs.masked_select(future & real_queries).abs().max() == 0
    assert out.attn_probs[0, :, :14, 14:].abs().max() == 0  # right padding keys
    assert out.attn_probs[1, :, 4:, :4].abs().max() == 0  # left padding keys


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_window_is_applied_at_the_aim_layer(family):
    model = make_model(family)
    window = model.config.sliding_window
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(model)(model, n_layers=1, copy=True)  # layer 0: sliding for both
    with torch.no_grad():
        probs = adapter(ids).attn_probs  # no padding: HF passes a mask only because the window bites
    q, k = torch.arange(20)[:, None], torch.arange(20)[None, :]
    outside = (k <= q - window) | (k > q)
    assert probs[0].masked_select(outside.expand(4, -1, -1)).abs().max() == 0
    assert probs[0, :, 19, 20 - window:].sum(-1).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(probs, hf_eager_reference(model, ids, torch.ones_like(ids), 0)[0])


def test_gemma3_multimodal_model_is_wrapped_through_its_language_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = tiny_config("gemma3", 120, **OVERRIDES["gemma3"])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_id=119, boi_token_id=117, eoi_token_id=118)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    ids, mask = padded_batch()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    ref_probs, ref_logits = ref.attentions[1], ref.logits
    model.set_attn_implementation("sdpa")

    assert adapter_for(model) is Gemma3ForAIM
    truncated = Gemma3ForAIM(model, n_layers=2, copy=True)
    full = Gemma3ForAIM(model, n_layers=2, with_ntp=True, copy=True)
    assert truncated.is_tied and len(truncated.get_layers()) == 2
    assert truncated.text_config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        out, out_full = truncated(ids, mask), full(ids, mask, return_logits=True)
    torch.testing.assert_close(out.attn_probs, ref_probs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out_full.logits, ref_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# truncation, early stop, NTP
# ---------------------------------------------------------------------------------------------
def test_truncation_and_forward_stops_after_aim_attention(family):
    model = make_model(family)
    adapter = adapter_for(model)(model, n_layers=2)
    layers = adapter.get_layers()
    assert len(layers) == 2 and adapter.text_config.num_hidden_layers == 2 and adapter.aim_layer == 1
    if hasattr(adapter.text_config, "layer_types"):
        assert len(adapter.text_config.layer_types) == 2

    calls: dict[str, int] = {}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    out_proj = {"gpt_neox": "attention.dense"}.get(family, "self_attn.o_proj")
    final_norm = {"gpt_neox": "final_layer_norm"}.get(family, "norm")
    hooks = [layers[i].mlp.register_forward_hook(count(f"mlp{i}")) for i in range(2)]
    hooks.append(layers[1].get_submodule(out_proj).register_forward_hook(count("aim_out_proj")))
    hooks.append(adapter.model.get_submodule(final_norm).register_forward_hook(count("final_norm")))
    hooks.append(adapter.causal_lm.get_output_embeddings().register_forward_hook(count("lm_head")))
    ids, mask = padded_batch()
    adapter(ids, mask)
    assert calls == {"mlp0": 1}
    for hook in hooks:
        hook.remove()


def test_with_ntp_keeps_full_depth_and_returns_hf_logits(family):
    model = make_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        sdpa_logits = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager_logits = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
    truncated = adapter_for(model)(model, n_layers=2, copy=True)
    full = adapter_for(model)(model, n_layers=2, with_ntp=True)
    assert len(full.get_layers()) == 4 and full.aim_layer == 1
    with torch.no_grad():
        out = full(ids, mask, return_logits=True)
        out_no_logits = full(ids, mask)
        short = truncated(ids, mask)
    assert out.logits.shape == (3, 20, VOCAB) and out_no_logits.logits is None
    torch.testing.assert_close(out.logits, eager_logits, atol=1e-5, rtol=1e-5)
    # HF's SDPA path treats fully masked padding rows differently; real tokens agree.
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], sdpa_logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.attn_probs, short.attn_probs) and torch.equal(out.values, short.values)


def test_teacher_and_student_of_the_same_model_capture_identical_tensors(family):
    model = make_model(family)
    teacher = adapter_for(model)(model, n_layers=2, copy=True)
    frozen = torch.zeros(VOCAB, dtype=torch.bool)
    frozen[::3] = True
    student = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=frozen)
    ids, mask = padded_batch()
    with torch.inference_mode():
        t = teacher(ids, mask)
    s = student(ids, mask)
    assert torch.equal(t.attn_probs, s.attn_probs) and torch.equal(t.values, s.values)
    assert s.attn_probs.requires_grad and s.values.requires_grad


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_capture_on_the_device_matches_cpu(device, family):
    """Capture at the AIM layer on the GPU (SDPA on the other layers) equals HF eager on CPU, and
    under bf16 autocast keeps float32 probabilities close to it."""
    model = make_model(family)
    ids, mask = padded_batch()
    ref_probs, ref_values = hf_eager_reference(model, ids, mask, layer=1)
    adapter = adapter_for(model)(model, n_layers=2, copy=True).to(device)
    with torch.no_grad():
        out = adapter(ids.to(device), mask.to(device))
        with torch.autocast(device, dtype=torch.bfloat16):
            mixed = adapter(ids.to(device), mask.to(device))
    torch.testing.assert_close(out.attn_probs.cpu(), ref_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.values.cpu(), ref_values, atol=1e-5, rtol=1e-4)
    assert mixed.attn_probs.dtype == torch.float32
    torch.testing.assert_close(mixed.attn_probs.cpu(), ref_probs, atol=3e-2, rtol=0)


def test_capture_keeps_float32_probs_under_bf16_autocast():
    model = make_model("llama")
    adapter = LlamaForAIM(model, n_layers=2)
    ids, mask = padded_batch()
    with torch.no_grad():
        exact = adapter(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = adapter(ids, mask)
    assert mixed.attn_probs.dtype == torch.float32 and mixed.values.dtype == torch.float32
    torch.testing.assert_close(mixed.attn_probs, exact.attn_probs, atol=3e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# PartlyFrozenEmbedding
# ---------------------------------------------------------------------------------------------
def test_partly_frozen_embedding_matches_nn_embedding_and_only_trains_free_rows():
    torch.manual_seed(0)
    reference = nn.Embedding(30, 8)
    frozen = torch.rand(30) < 0.5
    table = PartlyFrozenEmbedding(reference.weight, frozen, scale=2.5)
    ids = torch.randint(0, 30, (4, 9))
    assert table.trainable.shape == (int((~frozen).sum()), 8)
    assert table.trainable.dtype == torch.float32 and not table.frozen.requires_grad
    torch.testing.assert_close(table(ids), reference(ids) * 2.5, atol=0, rtol=0)
    assert torch.equal(table.full_weight(), reference.weight.detach())
    assert not table.full_weight().requires_grad

    (table(ids) ** 2).sum().backward()
    (reference(ids) * 2.5).pow(2).sum().backward()
    torch.testing.assert_close(table.trainable.grad, reference.weight.grad[~frozen])
    assert [p for p in table.parameters() if p.requires_grad] == [table.trainable]

    with torch.no_grad():
        table.trainable.add_(1.0)
    moved = table.full_weight()
    assert torch.equal(moved[frozen], reference.weight.detach()[frozen])
    assert torch.equal(moved[~frozen], reference.weight.detach()[~frozen] + 1.0)


@pytest.mark.parametrize("mask", [None, "all_false", "all_true"])
def test_partly_frozen_embedding_degenerate_masks(mask):
    weight = torch.randn(12, 4)
    frozen = {None: None, "all_false": torch.zeros(12, dtype=torch.bool),
              "all_true": torch.ones(12, dtype=torch.bool)}[mask]
    table = PartlyFrozenEmbedding(weight, frozen)
    ids = torch.tensor([[0, 5, 11]])
    assert torch.equal(table(ids), weight[ids])
    assert table.num_trainable == (0 if mask == "all_true" else 12)
    assert torch.equal(table.full_weight(), weight)


def test_partly_frozen_embedding_keeps_model_dtype_and_padding_row():
    weight = torch.randn(10, 4).to(torch.bfloat16)
    table = PartlyFrozenEmbedding(weight, torch.arange(10) < 3, padding_idx=7)
    ids = torch.tensor([[7, 7, 1, 8]])
    out = table(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, weight[ids])
    out.float().sum().backward()
    pad_row = int(table.trainable_row[7])
    assert table.trainable.grad[pad_row].abs().sum() == 0
    assert table.trainable.grad[int(table.trainable_row[8])].abs().sum() > 0


def test_partly_frozen_embedding_errors():
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        PartlyFrozenEmbedding(torch.randn(10, 4), torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        PartlyFrozenEmbedding(torch.randn(10, 4), torch.zeros(10))
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        PartlyFrozenEmbedding(torch.randn(10, 4))(torch.tensor([[3, 10]]))


def test_gemma_embeddings_keep_scale_and_are_bit_identical():
    model = make_model("gemma3")
    original = model.get_input_embeddings()
    ids, _ = padded_batch()
    with torch.no_grad():
        expected = original(ids)
    adapter = Gemma3ForAIM(model, frozen_embeddings_mask=torch.arange(VOCAB) % 2 == 0)
    assert torch.equal(adapter.input_embeddings(ids), expected)
    assert torch.equal(adapter.input_embedding_weight(), original.weight.detach())  # unscaled


# ---------------------------------------------------------------------------------------------
# trainable parameters and output modes
# ---------------------------------------------------------------------------------------------
def frozen_mask() -> torch.Tensor:
    return torch.arange(VOCAB) < 40


def test_only_embedding_rows_train(family):
    model = make_model(family)
    adapter = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=frozen_mask())
    params = adapter.trainable_parameters()
    assert params == [adapter.input_embeddings.trainable]
    assert params[0].shape == (VOCAB - 40, 64)
    assert adapter.is_tied == (family in TIED)


@pytest.mark.parametrize("family", sorted(TIED))
def test_output_modes_of_tied_models(family):
    model = make_model(family)
    initial = model.get_input_embeddings().weight.detach().clone()
    ids, mask = padded_batch()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    adapter = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=frozen_mask(), with_ntp=True)
    table = adapter.input_embeddings
    head = adapter.get_output_embeddings()
    assert adapter.output_mode == "tied" and isinstance(head, EmbeddingLMHead) and head.table is table
    assert adapter.output_embedding_weight() is None
    assert adapter.trainable_parameters() == [table.trainable]

    # the partly frozen tied head computes the model's logits; NTP gradient reaches the table
    logits = adapter(ids, mask, return_logits=True).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    logits.sum().backward()
    assert table.trainable.grad is not None and table.trainable.grad.abs().sum() > 0
    table.trainable.grad = None

    with torch.no_grad():
        table.trainable.add_(0.5)
    adapter.set_output_mode("keep_init")
    head = adapter.get_output_embeddings()
    assert not head.weight.requires_grad and adapter.config.tie_word_embeddings is False
    assert head.weight.data_ptr() != table.trainable.data_ptr()
    assert torch.equal(adapter.output_embedding_weight(), adapter.input_embedding_weight())
    assert adapter.trainable_parameters() == [table.trainable]
    with torch.no_grad():
        table.trainable.add_(1.0)  # training the input side leaves the kept head alone
    assert not torch.equal(adapter.output_embedding_weight(), adapter.input_embedding_weight())

    adapter.set_output_mode("ntp")
    head = adapter.get_output_embeddings()
    assert isinstance(head, EmbeddingLMHead) and head.table is not table
    assert head.table.trainable.data_ptr() != table.trainable.data_ptr()
    assert adapter.trainable_parameters() == [table.trainable, head.table.trainable]
    assert torch.equal(head.table.frozen_mask, frozen_mask())
    assert torch.equal(adapter.output_embedding_weight()[:40], initial[:40])  # frozen rows kept

    adapter.set_output_mode("tied")
    assert adapter.get_output_embeddings().table is table and adapter.output_embedding_weight() is None


def test_ntp_output_mode_needs_with_ntp():
    model = make_model("llama")
    adapter = LlamaForAIM(model, n_layers=2)
    with pytest.raises(ValueError, match="with_ntp=True"):
        adapter.set_output_mode("ntp")
    with pytest.raises(ValueError, match="choose one of"):
        adapter.set_output_mode("untied")


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gpt_neox"])
def test_untied_head_trains_iff_with_ntp(family):
    model = make_model(family)
    head_weight = model.get_output_embeddings().weight.detach().clone()
    aim_only = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=frozen_mask(), copy=True)
    assert not aim_only.is_tied and aim_only.output_mode is None
    assert aim_only.trainable_parameters() == [aim_only.input_embeddings.trainable]
    assert torch.equal(aim_only.output_embedding_weight(), head_weight)
    with pytest.raises(ValueError, match="untied"):
        aim_only.set_output_mode("keep_init")

    with_ntp = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=frozen_mask(), with_ntp=True)
    head = with_ntp.get_output_embeddings()
    assert isinstance(head, EmbeddingLMHead)
    assert with_ntp.trainable_parameters() == [with_ntp.input_embeddings.trainable, head.table.trainable]
    assert head.table.trainable.shape == (VOCAB - 40, 64)
    assert torch.equal(with_ntp.output_embedding_weight(), head_weight)
    frozen_names = {n for n, p in with_ntp.named_parameters() if not p.requires_grad}
    assert frozen_names and not any("embed" in n or "lm_head" in n for n in frozen_names)


# ---------------------------------------------------------------------------------------------
# clear errors and the registry
# ---------------------------------------------------------------------------------------------
def test_default_n_layers_is_a_third_of_the_depth():
    assert LlamaForAIM(make_model("llama", num_hidden_layers=6)).n_layers == 2
    assert LlamaForAIM(make_model("llama", num_hidden_layers=1)).n_layers == 1
    assert LlamaForAIM(make_model("llama", num_hidden_layers=4)).aim_layer == 0


@pytest.mark.parametrize("n_layers", [0, 5, -1, 2.0])
def test_bad_n_layers_names_the_problem(n_layers):
    with pytest.raises(ValueError, match=r"n_layers=.*4 layers"):
        LlamaForAIM(make_model("llama"), n_layers=n_layers)


def test_one_registry_lists_the_families():
    assert list(registry.FAMILIES) == list(FAMILIES) == ["llama", "gemma3", "mistral", "qwen3", "gpt_neox"]
    for name, family in registry.FAMILIES.items():
        assert family.adapter is ADAPTERS[name] and set(family.model_types) <= set(family.adapter.model_types)
    # Llama, Mistral and Qwen3 share one class; each family still covers only its own model_type
    assert ADAPTERS["llama"] is ADAPTERS["mistral"] is ADAPTERS["qwen3"]
    assert [family_of(t) for t in ("llama", "mistral", "qwen3", "gemma3_text", "gemma3", "gpt2")] == [
        "llama", "mistral", "qwen3", "gemma3", "gemma3", None]


def test_register_adapter_checks_what_it_is_given(saved_families):
    class NoTypes(LlamaForAIM):
        model_types = ()

    class Qwen2ForAIM(LlamaForAIM):  # a family laid out like Llama needs only its model_types
        model_types = ("qwen2",)

    with pytest.raises(ValueError, match=r"NoTypes\.model_types is empty"):
        register_adapter(NoTypes)
    with pytest.raises(ValueError, match=r"Qwen2ForAIM does not handle model_type \['qwen2_moe'\]"):
        register_adapter(Qwen2ForAIM, "qwen2", ("qwen2", "qwen2_moe"))
    with pytest.raises(ValueError, match=r"model_type 'llama' already belongs to family 'llama'"):
        register_adapter(LlamaForAIM, "my_llama", ("llama",))
    assert list(registry.FAMILIES) == list(FAMILIES)  # nothing was half-registered

    assert register_adapter(Qwen2ForAIM) is Qwen2ForAIM  # usable as a decorator
    assert adapter_for(tiny_config("llama", VOCAB, model_type="qwen2")) is Qwen2ForAIM

    class MyLlamaForAIM(LlamaForAIM):
        model_types = ("llama",)

    register_adapter(MyLlamaForAIM)  # the family's own name replaces it
    assert adapter_for(tiny_config("llama", VOCAB)) is MyLlamaForAIM
    assert adapter_for(tiny_config("mistral", VOCAB)) is LlamaForAIM


def test_registry_and_wrong_adapter_errors():
    from transformers import GPT2Config

    for family in FAMILIES:
        assert adapter_for(tiny_config(family, VOCAB)) is ADAPTERS[family]
    with pytest.raises(ValueError, match=r"'gpt2'.*supported.*gemma3_text.*Adding a model family"):
        adapter_for(GPT2Config())
    with pytest.raises(ValueError, match="adapter_for"):
        LlamaForAIM(make_model("gemma3"))
    with pytest.raises(ValueError, match="adapter_for"):
        GPTNeoXForAIM(make_model("qwen3"))


def test_wrapping_one_model_object_twice_is_refused():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LlamaForAIM(model, n_layers=2, copy=True)  # the original is left untouched
    assert len(model.model.layers) == 4 and type(model.get_input_embeddings()) is nn.Embedding
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    LlamaForAIM(model, n_layers=2)
    for copy in (False, True):
        with pytest.raises(ValueError, match="already wrapped.*copy=True"):
            LlamaForAIM(model, n_layers=2, copy=copy)


def test_bf16_model_keeps_its_dtype_with_float32_master_rows():
    model = make_model("qwen3").to(torch.bfloat16)
    adapter = Qwen3ForAIM(model, n_layers=2, frozen_embeddings_mask=frozen_mask(), with_ntp=True)
    ids, mask = padded_batch()
    out = adapter(ids, mask, return_logits=True)
    assert out.attn_probs.dtype == torch.float32 and out.values.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    assert adapter.input_embeddings.frozen.dtype == torch.bfloat16
    (out.attn_probs.sum() + out.logits.float().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())


def test_bad_frozen_mask_is_rejected_before_the_model_is_touched():
    model = make_model("gemma3")
    with pytest.raises(ValueError, match=rf"one entry per embedding row \({VOCAB},\).*\({VOCAB - 1},\)"):
        Gemma3ForAIM(model, frozen_embeddings_mask=torch.zeros(VOCAB - 1, dtype=torch.bool))
    assert len(model.model.layers) == 4 and model.config._attn_implementation == "sdpa"
    Gemma3ForAIM(model, frozen_embeddings_mask=torch.zeros(VOCAB, dtype=torch.bool))  # still wrappable


def test_return_logits_needs_with_ntp():
    adapter = LlamaForAIM(make_model("llama"), n_layers=2)
    with pytest.raises(ValueError, match="with_ntp=True"):
        adapter(*padded_batch(), return_logits=True)


def test_check_compatible_names_the_differing_field():
    teacher = LlamaForAIM(make_model("llama"), n_layers=2)
    check_compatible(teacher, LlamaForAIM(make_model("llama", seed=1), n_layers=2))
    with pytest.raises(ValueError, match=r"aim_layer differs \(teacher 1, student 0\)"):
        check_compatible(teacher, LlamaForAIM(make_model("llama"), n_layers=1))
    with pytest.raises(ValueError, match=r"num_key_value_heads differs \(teacher 2, student 4\)"):
        check_compatible(teacher, LlamaForAIM(make_model("llama", num_key_value_heads=4), n_layers=2))
    with pytest.raises(ValueError, match="model_type differs"):
        check_compatible(teacher, MistralForAIM(make_model("mistral"), n_layers=2))


def test_check_vocab(byte_level_tokenizer):
    vocab = len(byte_level_tokenizer)
    check_vocab(LlamaForAIM(tiny_model("llama", vocab), n_layers=1), byte_level_tokenizer)
    with pytest.raises(ValueError, match=f"embedding rows {vocab - 1} < tokenizer vocab {vocab}"):
        check_vocab(LlamaForAIM(tiny_model("llama", vocab - 1), n_layers=1), byte_level_tokenizer)


def test_from_pretrained_loads_a_saved_directory(tmp_path):
    model = make_model("qwen3")
    model.save_pretrained(tmp_path)
    adapter = Qwen3ForAIM.from_pretrained(str(tmp_path), n_layers=2)
    assert isinstance(adapter, PreTrainedModelForAIM) and len(adapter.get_layers()) == 2
    wrapped = Qwen3ForAIM.from_pretrained(model, n_layers=2, copy=True)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(adapter(ids, mask).attn_probs, wrapped(ids, mask).attn_probs)
    with pytest.raises(ValueError, match="already loaded"):
        Qwen3ForAIM.from_pretrained(model, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# end to end: a few steps on the student's embeddings pull its attention towards the teacher's
# ---------------------------------------------------------------------------------------------
def test_sgd_on_student_embeddings_reduces_attention_output_gap(family):
    model = make_model(family)
    teacher = adapter_for(model)(model, n_layers=2, copy=True)
    with torch.no_grad():  # the student starts from perturbed embeddings
        embed = model.get_input_embeddings().weight
        embed.add_(torch.randn(embed.shape, generator=torch.Generator().manual_seed(3)) * embed.std())
    student = adapter_for(model)(model, n_layers=2, frozen_embeddings_mask=torch.arange(VOCAB) < 10)
    ids, mask = padded_batch()
    with torch.inference_mode():
        t = teacher(ids, mask)
    target = (t.attn_probs @ t.values).clone()
    real = mask.bool()[:, None, :, None]

    optimizer = torch.optim.Adam(student.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        s = student(ids, mask)
        loss = ((s.attn_probs @ s.values - target) ** 2).masked_select(real).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(student.input_embedding_weight()[:10], embed.detach()[:10])  # frozen rows intact


def test_a_new_family_needs_only_two_hooks(saved_families):
    """The README recipe: a user adapter for a family MATT does not ship (Qwen2 here); its layers are
    found by the default `get_layers` / `set_layers` (the decoder stack's `layers`)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    class Qwen2ForAIM(PreTrainedModelForAIM):
        model_types = ("qwen2",)

        def get_base_model(self, model):
            return model.model

        def create_partly_frozen_embeddings(self, frozen_mask):
            return PartlyFrozenEmbedding.from_embedding(self.base_model.embed_tokens, frozen_mask)

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with pytest.raises(ValueError, match="'qwen2'"):
        adapter_for(model)
    register_adapter(Qwen2ForAIM)
    assert adapter_for(model) is Qwen2ForAIM and registry.FAMILIES["qwen2"].model_types == ("qwen2",)
    ids, mask = padded_batch()
    ref_probs, ref_values = hf_eager_reference(model, ids, mask, layer=0)
    with torch.no_grad():
        out = Qwen2ForAIM(model)(ids, mask)  # default n_layers = round(3 / 3) = 1
    torch.testing.assert_close(out.attn_probs, ref_probs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.values, ref_values, atol=2e-6, rtol=1e-5)
