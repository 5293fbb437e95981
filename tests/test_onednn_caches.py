"""`import matt` caps oneDNN's shape-keyed kernel caches (resident memory stays flat under bf16 autocast
with varying sequence lengths; measured in `make bench`, part 5) and keeps a value the user set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from matt.config import ONEDNN_CACHE_CAPACITY

REPO = Path(__file__).resolve().parents[1]
NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def env_after_import(**preset: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(preset, PYTHONPATH=str(REPO))
    code = "import os, matt; print(' '.join(os.environ[n] for n in %r))" % (NAMES,)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_caps_both_caches_and_keeps_a_user_value():
    assert env_after_import() == [str(ONEDNN_CACHE_CAPACITY)] * 2
    assert env_after_import(LRU_CACHE_CAPACITY="7") == [str(ONEDNN_CACHE_CAPACITY), "7"]
