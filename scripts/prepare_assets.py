#!/usr/bin/env python
"""Prepare the offline models and corpora (`make assets`) and print what is in the cache.

    python scripts/prepare_assets.py                         # what `make demo` needs
    python scripts/prepare_assets.py --models smollm2_135m,gemma3_270m --corpora manpages_uk,python_doc_en
    python scripts/prepare_assets.py --all

The cache is `$MATT_ASSETS`, else `<repo>/assets/`. Prepared assets are left as they are.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from matt.assets import ASSETS, AssetError, cache_root, describe, resolve  # noqa: E402

DEMO_MODELS = ("smollm2_135m",)
DEMO_CORPORA = ("manpages_uk",)


def _names(value: str, kind: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    known = [n for n, spec in ASSETS.items() if spec.kind == kind]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda v: _names(v, "model"), default=list(DEMO_MODELS),
                        help="comma-separated model assets (default: %(default)s)")
    parser.add_argument("--corpora", type=lambda v: _names(v, "corpus"), default=list(DEMO_CORPORA),
                        help="comma-separated corpus assets (default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="every known asset")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = list(ASSETS) if args.all else [*args.models, *args.corpora]

    print(f"asset cache: {cache_root()}")
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            resolve(name)
        except AssetError as error:
            failed.append(name)
            print(f"FAILED {name}: {error}", file=sys.stderr)
            continue
        print(f"{name}: ready ({time.perf_counter() - t0:.1f} s)")
    print()
    print(_report(names))
    if failed:
        print(f"\nnot prepared: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _report(names: list[str]) -> str:
    rows = [("asset", "kind", "size", "contents", "path")]
    for name in names:
        info = describe(name)
        if not info["prepared"]:
            rows.append((name, info["kind"], "-", "not prepared", info["path"]))
            continue
        facts = info["facts"]
        if info["kind"] == "model":
            contents = (f"{facts['parameters'] / 1e6:.1f}M params, {facts['dtype']}, "
                        f"vocab {facts['vocab_size']}")
        else:
            stats = facts["stats"]
            contents = ", ".join(f"{split} {stats[split]['documents']} docs / "
                                 f"{stats[split]['characters'] / 1e6:.2f}M chars"
                                 for split in ("train", "validation", "test"))
        rows.append((name, info["kind"], info["size"], contents, info["path"]))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


if __name__ == "__main__":
    sys.exit(main())
