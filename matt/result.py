"""`TransferResult`: what a MATT run produces — the learned embeddings — and how to install them.

Kept separate from any model object so the result of a cheap truncated-model run can be applied
to the full-depth model (or saved and applied later, on another machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class TransferResult:
    input_embeddings: torch.Tensor
    """(V_student, D) learned input embeddings, unscaled (as stored in the model's weight)."""
    output_embeddings: torch.Tensor | None = None
    """(V_student, D) LM-head weights when the output side is untied from the input side."""
    tie_word_embeddings: bool = True
    """Whether the adapted model should share input and output embeddings."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final training metrics (last logged values, wall-clock, steps)."""

    def __post_init__(self) -> None:
        if self.tie_word_embeddings and self.output_embeddings is not None:
            raise ValueError("TransferResult: tied embeddings cannot carry separate output_embeddings")
        if not self.tie_word_embeddings and self.output_embeddings is None:
            raise ValueError("TransferResult: untied embeddings need output_embeddings")
        if self.output_embeddings is not None and self.output_embeddings.shape != self.input_embeddings.shape:
            raise ValueError(
                f"TransferResult: output embeddings {tuple(self.output_embeddings.shape)} do not match "
                f"input embeddings {tuple(self.input_embeddings.shape)}"
            )

    @property
    def vocab_size(self) -> int:
        return self.input_embeddings.shape[0]

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Install the embeddings into a full HF causal LM (in place; also returned).

        Resizes the vocabulary to the student's, copies the input embeddings, and ties or unties
        the LM head as the run decided (e.g. `keep_init` untied a natively tied model).
        """
        in_emb = model.get_input_embeddings()
        if in_emb.weight.shape[1] != self.input_embeddings.shape[1]:
            raise ValueError(
                f"apply_to: model hidden size {in_emb.weight.shape[1]} != learned embedding size "
                f"{self.input_embeddings.shape[1]} (a different model family or size?)"
            )
        model.resize_token_embeddings(self.vocab_size, mean_resizing=False)
        in_emb = model.get_input_embeddings()
        with torch.no_grad():
            in_emb.weight.copy_(self.input_embeddings.to(in_emb.weight))
        config = model.config.get_text_config()
        config.tie_word_embeddings = model.config.tie_word_embeddings = self.tie_word_embeddings
        out_emb = model.get_output_embeddings()
        if self.tie_word_embeddings:
            out_emb.weight = in_emb.weight
        else:
            weight = self.output_embeddings.to(dtype=in_emb.weight.dtype, device=in_emb.weight.device).clone()
            out_emb.weight = nn.Parameter(weight, requires_grad=in_emb.weight.requires_grad)
            if getattr(out_emb, "bias", None) is not None and out_emb.bias.shape[0] != self.vocab_size:
                out_emb.bias = nn.Parameter(torch.zeros(self.vocab_size, dtype=weight.dtype, device=weight.device))
            if hasattr(out_emb, "out_features"):
                out_emb.out_features = self.vocab_size
        config.vocab_size = self.vocab_size
        return model

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `embeddings.safetensors` (+ metrics JSON) into `directory`; returns the file."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"input_embeddings": self.input_embeddings.detach().cpu().contiguous()}
        if self.output_embeddings is not None:
            tensors["output_embeddings"] = self.output_embeddings.detach().cpu().contiguous()
        path = directory / EMBEDDINGS_FILE
        save_file(tensors, str(path), metadata={"tie_word_embeddings": str(self.tie_word_embeddings)})
        (directory / "metrics.json").write_text(json.dumps(self.metrics, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TransferResult":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / EMBEDDINGS_FILE
        if not path.exists():
            raise FileNotFoundError(f"No learned embeddings at {path}")
        with safe_open(str(path), framework="pt") as f:
            tie = f.metadata().get("tie_word_embeddings", "True") == "True"
            inputs = f.get_tensor("input_embeddings")
            outputs = f.get_tensor("output_embeddings") if "output_embeddings" in f.keys() else None
        metrics_file = path.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return cls(inputs, outputs, tie, metrics)
