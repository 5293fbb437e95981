"""`make gpu-check`: everything MATT does on a GPU, in about 5 minutes on one device, as one table.

    python scripts/gpu_check.py               # on a machine with a CUDA device
    python scripts/gpu_check.py --cpu-smoke   # the same stages at toy sizes on CPU (checks this script)

Stages:
1. the unit tests that have a CUDA variant (`pytest -m cuda`: chunked LM-head cross-entropy vs
   `F.cross_entropy`, full AIM vs the naive definition, capture at the AIM layer vs HF eager on CPU,
   two bf16 training steps with the NTP head);
2. `benchmarks/bench_aim.py` on CUDA, in one process (the CUDA allocator's peak statistics
   replace the per-measurement processes the CPU benchmark needs): the AIM loss at L=512, the
   training step (MATT vs floor vs reference vs NTP, fp32 and bf16) and the NTP-head step on
   Gemma 3 270M shapes;
3. a short bf16 transfer on Gemma 3 270M (`experiment=demo_gemma3`, 30 steps, NTP-fitted head,
   bits-per-byte on a few documents) — needs the Gemma asset under $MATT_ASSETS.

Without a CUDA device it prints why and exits 0 having run nothing (unless --cpu-smoke).
Results: the table on stdout and in `gpu_check/` (markdown + the raw outputs of each stage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEMMA_ASSET = "gemma3_270m"


def run_stage(name: str, command: list[str], log: Path, timeout: int) -> tuple[int, float]:
    """Run `command` from the repository root, output to `log`; (exit code, seconds)."""
    print(f"[gpu-check] {name}: {' '.join(command)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu-check] timed out after {timeout} s\n")
            code = 124
    seconds = time.perf_counter() - start
    print(f"[gpu-check] {name}: exit {code} after {seconds:.0f} s (log: {log})", flush=True)
    return code, seconds


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def bench_rows(results: dict) -> list[tuple[str, str]]:
    """The benchmark's headline numbers from its JSON output."""
    rows = []
    loss = [r for r in results.get("loss", []) if not r.get("skipped")]
    for shape in sorted({r["shape"] for r in loss}):
        by = {r["impl"]: r for r in loss if r["shape"] == shape}
        if "aim" in by and "aim_star" in by:
            full, star = by["aim"], by["aim_star"]
            rows.append((f"bench: AIM loss {shape} L={full['L']}",
                         f"full {full['seconds'] * 1e3:.1f} ms / AIM* {star['seconds'] * 1e3:.1f} ms = "
                         f"{full['seconds'] / star['seconds']:.2f}x; +{full['peak_extra_mb']:.0f} MB"))
    step = {(r["kind"], r["precision"]): r for r in results.get("step", [])}
    if ("matt", "32") in step and ("floor", "32") in step:
        matt, floor = step["matt", "32"], step["floor", "32"]
        line = (f"MATT {matt['tokens_per_s']:.0f} tok/s, MATT/floor {matt['seconds'] / floor['seconds']:.2f}x")
        if ("ntp", "32") in step:
            line += f", MATT/NTP {matt['seconds'] / step['ntp', '32']['seconds']:.2f}x"
        if ("matt", "bf16-mixed") in step:
            line += f", bf16 speed-up {matt['seconds'] / step['matt', 'bf16-mixed']['seconds']:.2f}x"
        rows.append(("bench: training step (SmolLM2 shapes)", line + f"; peak {matt['peak_rss_mb']:.0f} MB"))
    ntp = {r["kind"]: r for r in results.get("ntp", []) if "kind" in r}
    if "aim" in ntp and "ntp_head" in ntp:
        rows.append(("bench: NTP-head step / AIM-only step (Gemma 3 270M shapes)",
                     f"{ntp['ntp_head']['seconds']:.3f} s / {ntp['aim']['seconds']:.3f} s = "
                     f"{ntp['ntp_head']['seconds'] / ntp['aim']['seconds']:.2f}x"))
    heads = [r for r in results.get("ntp", []) if r.get("impl") == "chunked"]
    if len(heads) >= 2:
        rows.append(("bench: chunked head-term peak memory vs vocabulary",
                     ", ".join(f"{r['vocab']:,} rows: +{r['peak_extra_mb']:.0f} MB" for r in heads)))
    for r in results.get("ops", []):
        if r["impl"] == "aim":
            kernels = f", {r['kernels']} CUDA kernels" if r.get("kernels") is not None else ""
            rows.append((f"bench: full AIM loss call {r['shape']} L={r['L']}", f"{r['ops']} aten ops{kernels}"))
    return rows


def transfer_rows(output_root: Path) -> list[tuple[str, str]]:
    runs = sorted(output_root.glob("runs/*/*/train_log.jsonl"))
    if not runs:
        return [("transfer", "no train_log.jsonl written")]
    run_dir = runs[-1].parent
    log = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
    last = log[-1]
    rows = [("transfer: training", f"{int(last['step'])} steps, loss {log[0]['loss']:.4g} -> {last['loss']:.4g}, "
             f"{last['tokens_per_s']:.0f} tok/s, peak {last['peak_memory_mb']:.0f} MB")]
    results = run_dir / "eval" / "results.json"
    if results.exists():
        models = json.loads(results.read_text())["models"]
        bpb = {name: m.get("bpb") for name, m in models.items() if isinstance(m, dict)}
        rows.append(("transfer: bits per byte", ", ".join(f"{k} {v:.3f}" for k, v in bpb.items()
                                                          if isinstance(v, (int, float)))))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run every stage at toy sizes on CPU")
    parser.add_argument("--bench-parts", default=None,
                        help="benchmark parts (default: loss,step,ntp,ops on CUDA; ntp,ops with --cpu-smoke)")
    parser.add_argument("--out", default=str(ROOT / "gpu_check"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu-check: skipped - no CUDA device is visible (torch.cuda.is_available() is False); nothing was run. "
              "Run it on a machine with a GPU (or `python scripts/gpu_check.py --cpu-smoke` to check the script).")
        return 0
    device = "cpu" if args.cpu_smoke else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    table: list[tuple[str, str, str]] = []  # (check, result, seconds)
    failed = False

    # 1. unit tests with a CUDA variant
    junit = out / "cuda_tests.xml"
    code, seconds = run_stage("unit tests", [python, "-m", "pytest", "-m", "cuda and not slow", "-q", "-p",
                                             "no:cacheprovider", f"--junitxml={junit}"], out / "cuda_tests.log", 150)
    counts = junit_counts(junit)
    bad = counts["failures"] + counts["errors"]
    passed = counts["tests"] - bad - counts["skipped"]
    failed |= code != 0 or bad > 0 or (device == "cuda" and passed == 0)
    table.append(("unit tests with a CUDA variant (`pytest -m cuda`)",
                  f"{passed} passed, {bad} failed, {counts['skipped']} skipped (exit {code})", f"{seconds:.0f}"))

    # 2. the benchmark on the device
    bench_out = out / "bench"
    parts = args.bench_parts or ("ntp,ops" if args.cpu_smoke else "loss,step,ntp,ops")
    bench = [python, "benchmarks/bench_aim.py", "--device", device, "--parts", parts, "--out", str(bench_out)]
    bench += ["--quick"] if args.cpu_smoke else ["--in-process", "--lengths", "512", "--repeats", "3", "--steps", "3"]
    code, seconds = run_stage("benchmark", bench, out / "bench.log", 180)
    failed |= code != 0
    stem = "bench_quick" if args.cpu_smoke else "bench"
    results_path = bench_out / f"{stem}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    table.append(("`make bench` on the device", f"exit {code}" + ("" if results else ", no results"), f"{seconds:.0f}"))
    table += [(name, value, "") for name, value in bench_rows(results)]

    # 3. a short bf16 transfer on Gemma 3 270M (tiny Llama smoke run with --cpu-smoke)
    transfer_root = out / "transfer"
    assets = Path(os.environ.get("MATT_ASSETS", ROOT / "assets"))
    if args.cpu_smoke:
        overrides = ["experiment=smoke", "train.max_steps=4", "train.precision=bf16-mixed", "eval=bpb_only",
                     "objective.output_embeddings=ntp", "objective.with_ntp=true", "objective.ntp_scope=head"]
    elif (assets / GEMMA_ASSET).exists():
        overrides = ["experiment=demo_gemma3", "init=mean", "train.max_steps=30", "train.precision=bf16-mixed",
                     "train.log_every_n_steps=5", "train.save_every_n_steps=0", "eval=bpb_only",
                     "eval.max_documents=8", "eval.max_bytes=20000", "objective.output_embeddings=ntp",
                     "objective.with_ntp=true", "objective.ntp_scope=head"]
    else:
        overrides = None
        table.append(("bf16 transfer, Gemma 3 270M", f"skipped: no {GEMMA_ASSET} asset under {assets} "
                                                     "(`make assets`, or set MATT_ASSETS)", ""))
    if overrides is not None:
        overrides += ["tracking=none", "train.progress_bar=false", f"paths.output_root={transfer_root}",
                      f"paths.cache_dir={transfer_root / 'cache'}"]
        code, seconds = run_stage("transfer", [python, "experiments/transfer.py", *overrides], out / "transfer.log", 240)
        failed |= code != 0
        label = "tiny Llama smoke transfer (bf16 autocast, NTP head)" if args.cpu_smoke else \
            "bf16 transfer, Gemma 3 270M (30 steps, NTP head)"
        table.append((label, f"exit {code}", f"{seconds:.0f}"))
        table += [(name, value, "") for name, value in transfer_rows(transfer_root)]

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (--cpu-smoke)"
    lines = [f"# gpu-check on {name} ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__})", "",
             "| check | result | s |", "|---|---|---|"]
    lines += [f"| {check} | {result} | {seconds} |" for check, result, seconds in table]
    lines += ["", "FAILED" if failed else "OK"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
