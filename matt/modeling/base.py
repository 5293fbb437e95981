"""`PreTrainedModelForAIM`: a HF causal LM seen through the AIM layer.

The wrapper does four things to the model it is given:

1. keeps only the first `n_layers` decoder layers (unless next-token prediction needs the full
   model), so the teacher and the AIM-only student never run the upper two thirds;
2. switches attention to the `matt_aim` implementation (see `matt.modeling.capture`), which
   records float32 attention probabilities and value states at layer `n_layers - 1` and uses
   SDPA everywhere else;
3. replaces the input embeddings with a `PartlyFrozenEmbedding` (the only trainable rows) and
   freezes every other parameter;
4. gives the LM head the role the run asks for (`set_output_mode`).

A family adapter only says where things live: two hooks (`get_base_model`,
`create_partly_frozen_embeddings`), plus `get_layers` / `set_layers` where the layers are not the
decoder stack's `layers` (the default). Everything else is here.

Wrapping modifies the model object in place (layers, config, attention implementation,
embedding and head modules, `requires_grad`); pass `copy=True` to wrap a deep copy instead.
A model object can be wrapped only once, so a teacher and a student built from one loaded model
need `copy=True` for (at least) the first of them.
"""

from __future__ import annotations

import copy as copy_module
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from matt.choices import OutputMode
from matt.modeling.capture import AIM_ATTENTION, AIMCapture, StopForward, attach_capture
from matt.modeling.embeddings import EmbeddingLMHead, PartlyFrozenEmbedding
from matt.modeling.lm_head_loss import IGNORE_INDEX, lm_head_cross_entropy

_WRAPPED_MARKER = "_matt_aim_wrapped_by"


@dataclass
class AIMOutput:
    """What the AIM layer saw in one forward pass.

    attn_probs: (B, H, L, L) float32 softmax probabilities, masks applied as the model applies them.
    values: (B, H, L, D) float32 value states, KV heads repeated to the H query heads.
    logits: (B, L, V) when asked for with `return_logits=True`, else None.
    hidden_states: (B, L, D) the LM head's input, when asked for with `return_hidden_states=True`.
    aim_hidden: (B, L, D) float32 output of the AIM decoder layer (the residual stream after it)
        when asked for with `return_aim_hidden=True`, else None (the `hidden` objective).
    """

    attn_probs: torch.Tensor
    values: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    aim_hidden: torch.Tensor | None = None


def default_n_layers(num_hidden_layers: int) -> int:
    """About a third of the depth, at least one layer."""
    return max(1, round(num_hidden_layers / 3))


class PreTrainedModelForAIM(nn.Module):
    """Base class of the family adapters (`LlamaForAIM`, `Gemma3ForAIM`, ...).

    Args:
        model: a loaded HF causal LM of the adapter's family (wrapped in place unless `copy`).
        n_layers: AIM layer = `n_layers - 1`; None = `max(1, round(num_hidden_layers / 3))`.
        frozen_embeddings_mask: (V,) bool, True = keep that embedding row (and, for untied
            models trained with NTP, that LM-head row) fixed. None = all rows trainable.
        with_ntp: keep the full depth so `forward(..., return_logits=True)` can return logits for
            a next-token-prediction term; untied LM heads become trainable.
        copy: wrap a deep copy of `model` and leave the caller's object untouched.

    A pure teacher can pass an all-True mask: its embeddings then stay in the model dtype
    without the float32 master copy trainable rows get.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    """`config.model_type` values this adapter handles (used by `adapter_for`)."""

    # ---- the family hooks -----------------------------------------------------------------
    def get_base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack inside the causal LM (holds the layers and the input embeddings)."""
        raise NotImplementedError

    def get_layers(self) -> nn.ModuleList:
        return self.model.layers

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.model.layers = nn.ModuleList(layers)

    def create_partly_frozen_embeddings(self, frozen_mask: torch.Tensor | None) -> PartlyFrozenEmbedding:
        """A `PartlyFrozenEmbedding` built from the family's input embedding module."""
        raise NotImplementedError

    # ---- construction --------------------------------------------------------------------
    def __init__(
        self,
        model: nn.Module,
        n_layers: int | None = None,
        frozen_embeddings_mask: torch.Tensor | None = None,
        with_ntp: bool = False,
        *,
        copy: bool = False,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"{type(self).__name__} wraps a transformers PreTrainedModel, got {type(model).__name__}")
        if self.model_types and config.model_type not in self.model_types:
            raise ValueError(
                f"{type(self).__name__} handles model_type {list(self.model_types)}, but this model is "
                f"{config.model_type!r}; use matt.modeling.adapter_for(model) to pick the adapter"
            )
        if getattr(model, _WRAPPED_MARKER, None) is not None:
            raise ValueError(
                f"This {type(model).__name__} object is already wrapped by {getattr(model, _WRAPPED_MARKER)} "
                "(which truncated it and replaced its embeddings). Load the model again for the second "
                "wrapper, or wrap it with copy=True the first time so the original stays untouched."
            )
        if copy:
            model = copy_module.deepcopy(model)
        self.causal_lm = model
        self.with_ntp = bool(with_ntp)

        depth = self.text_config.num_hidden_layers
        if n_layers is None:
            n_layers = default_n_layers(depth)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= depth:
            raise ValueError(
                f"n_layers={n_layers!r} is invalid for {self._model_name()} with {depth} layers: "
                f"choose an integer in [1, {depth}] (the AIM layer is n_layers - 1)"
            )
        self.n_layers = n_layers
        self.original_num_layers = depth
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        self.is_tied = head is not None and head.weight is embeddings.weight  # as loaded
        self.output_mode: str | None = None  # tied / keep_init / ntp for tied models, None for untied ones
        frozen_mask = None if frozen_embeddings_mask is None else torch.as_tensor(frozen_embeddings_mask)
        rows = embeddings.weight.shape[0]
        if frozen_mask is not None and (frozen_mask.dtype != torch.bool or frozen_mask.shape != (rows,)):
            raise ValueError(
                f"frozen_embeddings_mask must be a bool tensor with one entry per embedding row ({rows},), "
                f"got dtype {frozen_mask.dtype} and shape {tuple(frozen_mask.shape)}"
            )

        model.requires_grad_(False)
        if not self.with_ntp:
            self._truncate(n_layers)
        model.set_attn_implementation(AIM_ATTENTION)
        self._capture = AIMCapture(self.aim_layer)
        attach_capture(self.get_layers()[self.aim_layer], self._capture)
        self.get_layers()[self.aim_layer].register_forward_hook(self._capture.record_layer_output)

        embeddings = self.create_partly_frozen_embeddings(frozen_mask)
        if not isinstance(embeddings, PartlyFrozenEmbedding):
            raise TypeError(f"{type(self).__name__}.create_partly_frozen_embeddings must return a "
                            f"PartlyFrozenEmbedding, got {type(embeddings).__name__}")
        model.set_input_embeddings(embeddings)
        if self.is_tied:
            self._set_tied_head()
        elif self.with_ntp:  # an untied head trains (except its frozen-mask rows)
            table = PartlyFrozenEmbedding(head.weight, embeddings.frozen_mask)
            self._install_head(EmbeddingLMHead(table, getattr(head, "bias", None)), tied=False)
        setattr(model, _WRAPPED_MARKER, type(self).__name__)
        self.eval()  # AIM compares deterministic attention: no dropout unless asked for

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike | nn.Module,
        n_layers: int | None = None,
        frozen_embeddings_mask: torch.Tensor | None = None,
        with_ntp: bool = False,
        *,
        copy: bool = False,
        **hf_kwargs,
    ) -> "PreTrainedModelForAIM":
        """Load with `AutoModelForCausalLM.from_pretrained(pretrained, **hf_kwargs)`, or wrap an
        already loaded model (in place unless `copy=True`)."""
        if isinstance(pretrained, nn.Module):
            if hf_kwargs:
                raise ValueError(f"HF loading arguments {sorted(hf_kwargs)} cannot apply to an already loaded model")
            model = pretrained
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(pretrained, **hf_kwargs)
            copy = False
        return cls(model, n_layers=n_layers, frozen_embeddings_mask=frozen_embeddings_mask,
                   with_ntp=with_ntp, copy=copy)

    def _model_name(self) -> str:
        config = self.causal_lm.config
        return getattr(config, "_name_or_path", "") or type(self.causal_lm).__name__

    def _truncate(self, n_layers: int) -> None:
        """Drop layers >= n_layers and shorten the config (and its per-layer `layer_types`) so HF's
        layer loops still line up."""
        self.set_layers(list(self.get_layers())[:n_layers])
        configs = {id(c): c for c in (self.text_config, self.causal_lm.config.get_text_config())}
        for config in configs.values():
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, (list, tuple)) and len(layer_types) == config.num_hidden_layers:
                config.layer_types = type(layer_types)(layer_types[:n_layers])
            config.num_hidden_layers = n_layers

    # ---- views ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The decoder stack (what `get_base_model` returns); the hooks reach layers through it."""
        return self.get_base_model(self.causal_lm)

    @property
    def base_model(self) -> nn.Module:
        """Alias of `model` (the decoder stack)."""
        return self.model

    @property
    def text_config(self):
        """The decoder's config (a Gemma 3 multimodal model's `text_config`)."""
        return self.model.config

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def aim_layer(self) -> int:
        """Index of the layer whose attention AIM matches."""
        return self.n_layers - 1

    @property
    def input_embeddings(self) -> PartlyFrozenEmbedding:
        return self.causal_lm.get_input_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        detach_head_input: bool = False,
        return_hidden_states: bool = False,
        return_aim_hidden: bool = False,
    ) -> AIMOutput:
        """Attention probabilities and values at the AIM layer (+ logits if `return_logits`, + the
        LM head's input if `return_hidden_states`, + the AIM layer's output if `return_aim_hidden`).

        Without either the forward stops right after the AIM layer's attention (after the whole AIM
        layer with `return_aim_hidden`). With `return_hidden_states` the model runs up to its LM head
        and stops there (no logits are computed; `lm_head_loss` turns them into the loss in chunks).
        With `detach_head_input` nothing computed after the AIM layer is differentiable w.r.t. the
        inputs: the layers above the AIM layer run on a detached copy of its output (so they record
        no autograd graph), and a loss on the logits trains the LM head only.
        """
        wants_head = return_logits or return_hidden_states
        if wants_head and not self.with_ntp:
            raise ValueError("return_logits / return_hidden_states need the full model: wrap it with with_ntp=True")
        if return_logits and return_hidden_states:
            raise ValueError("ask for either return_logits or return_hidden_states, not both")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        self._capture.reset(stop_after_capture=not wants_head, capture_hidden=return_aim_hidden)
        logits, head_input = None, []
        head = self.causal_lm.get_output_embeddings()
        hooks = []
        if wants_head and detach_head_input:
            above = self.aim_layer + 1
            layers = self.get_layers()
            target = layers[above] if above < len(layers) else head
            hooks.append(target.register_forward_pre_hook(_detach_hidden_states, with_kwargs=True))
        if return_hidden_states:
            def stop_at_head(module: nn.Module, args: tuple):
                head_input.append(args[0])
                raise StopForward  # the logits are not needed

            hooks.append(head.register_forward_pre_hook(stop_at_head))
        try:
            logits = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        except StopForward:
            pass  # what was asked for is recorded; nothing after it was needed
        except BaseException:
            self._capture.reset(stop_after_capture=True)  # drop half-recorded tensors
            raise
        finally:
            for hook in hooks:
                hook.remove()
        aim_hidden = self._capture.take_hidden() if return_aim_hidden else None
        attn_probs, values = self._capture.take()
        hidden_states = None
        if return_hidden_states:
            if not head_input:
                raise RuntimeError(f"{self._model_name()} never called its LM head: no hidden states to return")
            hidden_states = head_input[0].detach() if detach_head_input else head_input[0]
        return AIMOutput(attn_probs=attn_probs, values=values, logits=logits, hidden_states=hidden_states,
                         aim_hidden=aim_hidden)

    def lm_head_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Mean cross-entropy of the LM head's logits on `hidden_states` (B, L, D) against `labels`
        (B, L; `ignore_index` = skip), equal to `F.cross_entropy` on this model's logits (with its
        final soft-capping) but computed in chunks: no (tokens × vocabulary) tensor, no gradient for
        frozen head rows (see `matt.modeling.lm_head_loss`)."""
        softcap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        return lm_head_cross_entropy(self.causal_lm.get_output_embeddings(), hidden_states, labels,
                                     softcap=softcap, ignore_index=ignore_index)

    # ---- student helpers -----------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should update (non-empty, requires_grad), each once."""
        return [p for p in self.parameters() if p.requires_grad and p.numel() > 0]

    def input_embedding_weight(self) -> torch.Tensor:
        """(V, D) input embeddings, unscaled, detached (float32)."""
        return self.input_embeddings.full_weight()

    def output_embedding_weight(self) -> torch.Tensor | None:
        """(V, D) LM-head weight, detached; None while the head is tied to the input embeddings."""
        if self.output_mode == "tied":
            return None
        head = self.causal_lm.get_output_embeddings()
        if isinstance(head, EmbeddingLMHead):
            return head.table.full_weight()
        return head.weight.detach()

    def set_output_mode(self, mode: OutputMode) -> None:
        """Choose what the LM head of a tied model becomes.

        tied: the head is the (trainable) input embedding table.
        keep_init: untie; the head is a frozen copy of the current input embeddings.
        ntp: untie; the head is a trainable copy (frozen-mask rows stay frozen), trained by the
            NTP term, so the wrapper must have `with_ntp=True`.
        """
        mode = OutputMode.parse(mode, "output mode")
        if not self.is_tied:
            raise ValueError(
                f"{self._model_name()} has untied input and output embeddings; output modes apply to tied "
                "models only (an untied LM head trains iff the wrapper has with_ntp=True)"
            )
        if mode == "tied":
            self._set_tied_head()
            return
        if mode == "ntp" and not self.with_ntp:
            raise ValueError("output mode 'ntp' trains the LM head with the NTP loss: "
                             "wrap the student with with_ntp=True")
        dtype = self.input_embeddings.frozen.dtype
        weight = self.input_embedding_weight().to(dtype)
        if mode == "keep_init":
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=dtype)
            head.weight = nn.Parameter(weight, requires_grad=False)
        else:
            head = EmbeddingLMHead(PartlyFrozenEmbedding(weight, self.input_embeddings.frozen_mask))
        self._install_head(head, tied=False)
        self.output_mode = mode

    def _set_tied_head(self) -> None:
        self._install_head(EmbeddingLMHead(self.input_embeddings), tied=True)
        self.output_mode = "tied"

    def _install_head(self, head: nn.Module, *, tied: bool) -> None:
        self.causal_lm.set_output_embeddings(head)
        for config in {id(c): c for c in (self.causal_lm.config, self.text_config)}.values():
            config.tie_word_embeddings = tied

    def extra_repr(self) -> str:
        return (f"n_layers={self.n_layers}/{self.original_num_layers}, aim_layer={self.aim_layer}, "
                f"with_ntp={self.with_ntp}, tied={self.is_tied}, output_mode={self.output_mode}")


def _detach_hidden_states(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the module's hidden-states input (first positional or keyword) detached."""
    if args:
        return (args[0].detach(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}


def attention_geometry(adapter: PreTrainedModelForAIM) -> dict[str, object]:
    """The fields two adapters must share for their AIM-layer tensors to be comparable."""
    config = adapter.text_config
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "aim_layer": adapter.aim_layer,
    }


def check_compatible(teacher: PreTrainedModelForAIM, student: PreTrainedModelForAIM) -> None:
    """Raise ValueError naming the first field in which the two AIM layers differ."""
    teacher_geometry, student_geometry = attention_geometry(teacher), attention_geometry(student)
    for field, value in teacher_geometry.items():
        if student_geometry[field] != value:
            raise ValueError(
                f"teacher and student are incompatible: {field} differs (teacher {value!r}, "
                f"student {student_geometry[field]!r})"
            )


def check_vocab(adapter: PreTrainedModelForAIM, tokenizer) -> None:
    """Raise ValueError when the tokenizer can emit ids that have no embedding row."""
    rows, vocab = adapter.input_embeddings.num_embeddings, len(tokenizer)
    if rows < vocab:
        raise ValueError(
            f"embedding rows {rows} < tokenizer vocab {vocab}: resize the model's embeddings to the "
            "tokenizer (e.g. matt.initialization.build_student_model) before wrapping"
        )
