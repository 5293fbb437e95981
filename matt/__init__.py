"""MATT — Model-Aware Tokenizer Transfer with Attention Influence Modeling (AIM)."""

from matt.config import MATTConfig, bound_onednn_caches

bound_onednn_caches()  # before any bf16 CPU kernel is built: keeps resident memory flat (see there)

__version__ = "0.1.0"
__all__ = ["MATT", "MATTConfig", "TransferResult", "__version__"]


def __getattr__(name: str):
    # Lazy: `import matt` stays cheap (no transformers/deepfocus import until needed).
    if name == "MATT":
        from matt.api import MATT

        return MATT
    if name == "TransferResult":
        from matt.result import TransferResult

        return TransferResult
    raise AttributeError(f"module 'matt' has no attribute {name!r}")
