"""`make bench` stays runnable: the benchmark script's cheapest part end to end at --quick sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_ops_part_writes_its_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_aim.py"), "--quick", "--parts", "ops",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "bench_quick.md").read_text()
    assert "## 6. Operations per AIM loss call" in table
    rows = json.loads((tmp_path / "bench_quick.json").read_text())["ops"]
    assert rows and all(row["ops"] > 0 for row in rows)


def test_bench_rejects_an_unknown_part(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_aim.py"), "--quick", "--parts", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "nope" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs for real (`make gpu-check`)")
def test_gpu_check_skips_cleanly_without_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped - no CUDA device" in done.stdout + done.stderr
