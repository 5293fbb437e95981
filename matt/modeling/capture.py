"""Capture attention probabilities and value states at exactly one layer of a HF decoder.

The AIM objective needs, at one layer, the softmax attention probabilities `A` (B,H,L,L) and
the value states `V` (B,H,L,D) that `A` mixes. Recording them for every layer (HF's
`attn_implementation="eager", output_attentions=True`) costs O(layers·L²) memory and gives up
SDPA everywhere, so instead we register one custom attention implementation, `matt_aim`, with
transformers' `AttentionInterface`:

* in the one attention module that carries an `AIMCapture` (the AIM layer's), it computes
  eager attention in float32 and stores `A` and `V` on the capture (autograd graph intact);
* in every other module it delegates to HF's own SDPA function, unchanged.

Its mask function is HF's `sdpa_mask` (a boolean mask, or None when SDPA's `is_causal` suffices,
which keeps the flash kernel for unpadded batches). Boolean masks are turned into the additive
masks eager attention uses (0 / dtype min) before SDPA or the AIM layer's softmax sees them, so
queries whose keys are all masked (left padding, padding under a sliding window) get eager's
uniform rows in every layer: the wrapped model reproduces HF eager attention everywhere, not
just at real tokens, and never produces NaNs from fully masked rows.

When the caller needs nothing after the AIM layer, the capture raises `StopForward` right
after recording, so the AIM layer's output projection and MLP, the later layers, the final norm
and the LM head never run.

For hidden-state objectives the capture can also record the AIM layer's *output* (the residual
stream after that decoder layer, `record_layer_output`, a forward hook on the layer); the forward
then stops after the layer instead of after its attention.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

AIM_ATTENTION = "matt_aim"
"""Name of the attention implementation registered with transformers."""

CAPTURE_ATTRIBUTE = "_matt_aim_capture"
"""Attribute naming the `AIMCapture` on the modules of the AIM layer (absent elsewhere)."""


class StopForward(Exception):
    """Raised after the AIM layer's attention is captured to skip the rest of the forward."""


class AIMCapture:
    """What one adapter's AIM layer records during one forward pass."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self.stop_after_capture = True
        self.capture_hidden = False
        self.attn_probs: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.hidden_states: torch.Tensor | None = None

    def reset(self, stop_after_capture: bool, capture_hidden: bool = False) -> None:
        self.stop_after_capture = stop_after_capture
        self.capture_hidden = capture_hidden
        self.attn_probs = None
        self.values = None
        self.hidden_states = None

    def record_layer_output(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook of the AIM decoder layer: keep its output (B, L, D) when asked to."""
        if not self.capture_hidden:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.hidden_states = hidden.float()
        if self.stop_after_capture:
            raise StopForward

    def take_hidden(self) -> torch.Tensor:
        """Hand over the recorded output of the AIM layer and forget it."""
        if self.hidden_states is None:
            raise RuntimeError(f"The forward pass never reached the output of AIM layer {self.layer_idx}")
        hidden, self.hidden_states = self.hidden_states, None
        return hidden

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand over the recorded tensors and forget them (no references outlive the step)."""
        if self.attn_probs is None or self.values is None:
            raise RuntimeError(
                f"The forward pass never reached the attention of AIM layer {self.layer_idx}; was the "
                f"model's attention implementation changed after wrapping (expected {AIM_ATTENTION!r})?"
            )
        attn_probs, values = self.attn_probs, self.values
        self.attn_probs = self.values = None
        return attn_probs, values


def attach_capture(layer: nn.Module, capture: AIMCapture) -> None:
    """Mark every module of the AIM decoder layer; only its attention calls the interface."""
    for module in layer.modules():
        setattr(module, CAPTURE_ATTRIBUTE, capture)


def additive_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    device: torch.device,
    *,
    causal: bool,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Float32 additive mask (0 = attend, float32 min = masked) from what HF passes to attention.

    HF passes a boolean (B,1,Q,K) mask, or None when SDPA may use `is_causal` (no padding and no
    biting sliding window); in that case the plain causal pattern is rebuilt here.
    """
    if attention_mask is None:
        if not causal:
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        kv_pos = torch.arange(kv_len, device=device)[None, :]
        allowed = kv_pos <= q_pos
        if sliding_window is not None:
            allowed &= kv_pos > q_pos - sliding_window
        attention_mask = allowed[None, None]
    attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        masked = torch.tensor(torch.finfo(torch.float32).min, device=device)
        return torch.where(attention_mask, torch.zeros((), device=device), masked)
    return attention_mask.float()


def eager_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    *,
    causal: bool = True,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scaling [softcapped] + mask) in float32, KV heads repeated to the query heads."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    # Autocast would run the matmul in half precision; AIM compares these numbers, keep fp32.
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = additive_mask(attention_mask, query.shape[-2], key.shape[-2], query.device,
                             causal=causal, sliding_window=sliding_window)
        if mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1, dtype=torch.float32)


def aim_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `matt_aim` attention: eager + capture at the AIM layer, HF's SDPA everywhere else."""
    capture: AIMCapture | None = getattr(module, CAPTURE_ATTRIBUTE, None)
    if capture is None:
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # additive, in the dtype attention really runs in (autocast included): see the module docstring
            masked = torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
            attention_mask = torch.where(attention_mask, torch.zeros_like(masked), masked)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap, **kwargs)
    if capture.attn_probs is not None:
        raise RuntimeError(f"AIM layer {capture.layer_idx} attention ran twice in one forward pass")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # Dropout is deliberately not applied: AIM matches deterministic attention patterns.
    probs = eager_attention_probs(query, key, attention_mask, scaling,
                                  causal=getattr(module, "is_causal", True), softcap=softcap,
                                  sliding_window=sliding_window)
    values = repeat_kv(value, query.shape[1] // value.shape[1])
    capture.attn_probs, capture.values = probs, values.float()
    if capture.stop_after_capture and not capture.capture_hidden:
        raise StopForward
    attn_output = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()
    return attn_output, probs


# make `matt_aim` a valid `attn_implementation`
AttentionInterface.register(AIM_ATTENTION, aim_attention_forward)
AttentionMaskInterface.register(AIM_ATTENTION, sdpa_mask)
