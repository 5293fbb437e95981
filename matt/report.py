"""Reports: MLflow runs of an experiment -> a paper-style table (markdown + CSV) and PNG plots.

Table rows: the original model (per teacher), each distinct initialisation before training
(e.g. FOCUS), and every trained run (labelled by method, e.g. `aim mse L10 keep_init`). For each
metric, the value and `% of original` of the same teacher - direction-aware: for accuracy-like
metrics 100·value/original, for bits per byte (lower is better) 100·original/value, so above 100
always means "better than the original" - and `recovery %` = 100·(x − init)/(original − init),
the share of the gap between the initialisation (e.g. FOCUS) and the original model that a row
closes, computed the same way for every metric with a direction (the paper's reading). Accuracies
carry their 95 % Wilson interval and, for trained rows, `Δ vs init`: the paired difference to the
initialisation of the same run on the same items (percentile bootstrap over items, from the
per-item credits in the run's `eval/results.json` artifact), marked `*` only when its 95 %
interval excludes 0; runs without per-item credits fall back to non-overlapping Wilson intervals
(conservative). Training wall-clock and peak memory per run come from the trainer's final metrics.

Plots: `loss_curves.png` (the AIM and NTP loss terms per run), `layer_depth.png` (AIM depth vs quality, time and
memory, when runs differ in depth), `methods.png` (bits per byte per table row), and for runs with a
probe (`probe.enabled`) `budget_curves.png` + `budget.md`: held-out measurements against training
seconds (`probe_histories`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matt.evaluation.intervals import PairedDifference, intervals_overlap, paired_bootstrap, ratio_bootstrap

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = {"bpb", "bpb_new", "bpb_shared"}
HIGHER_IS_BETTER = {"choice_accuracy", "choice_accuracy_pmi", "chrf"}
"""Model-quality metrics get a `% of original` column; compression, counts and the unigram floor
do not (they describe the tokenizer, not how much of the model's quality was kept)."""
CI_SUFFIXES = ("_ci_low", "_ci_high")
ITEM_KEYS = {"choice_accuracy": "choice_credits", "choice_accuracy_pmi": "choice_credits_pmi"}
"""Accuracy metric -> its per-item credit list in `eval/results.json` (as in `matt.pipeline.evaluate`)."""
DOCUMENT_KEYS = {"bpb": ("bpb_document_bits", "bpb_document_bytes")}
"""Ratio metric -> its per-document (bits, bytes) lists in `eval/results.json`."""
UNIT_KEYS = frozenset([*ITEM_KEYS.values(), *(key for keys in DOCUMENT_KEYS.values() for key in keys)])
"""Every per-item / per-document list a model's results may hold (kept out of MLflow metrics)."""
TIME_METRIC = "train/final_wall_clock_s"
MEMORY_METRIC = "train/final_peak_memory_mb"


def metric_direction(name: str) -> int | None:
    """+1 when higher is better, -1 when lower is better, None when unknown (no % shown)."""
    if name in LOWER_IS_BETTER:
        return -1
    if name in HIGHER_IS_BETTER:
        return 1
    if name.startswith("lm_eval/"):
        if "stderr" in name:
            return None
        if any(word in name for word in ("perplexity", "bits_per", "loss")):
            return -1
        return 1
    return None


def percent_of_baseline(name: str, value: float | None, baseline: float | None) -> float | None:
    """How much of the baseline's quality `value` keeps, in percent (see the module docstring)."""
    direction = metric_direction(name)
    if direction is None or value is None or baseline is None:
        return None
    if any(not math.isfinite(x) for x in (value, baseline)):
        return None
    if direction > 0:
        return 100.0 * value / baseline if baseline else None
    return 100.0 * baseline / value if value else None


def recovery(value: float | None, original: float | None, init: float | None) -> float | None:
    """(value − init) / (original − init): 0 at the initialisation, 1 at the original model, the
    same formula for every metric (for bits per byte both differences are negative when the
    transfer helps). None when a value is missing or not finite or original == init."""
    if value is None or original is None or init is None:
        return None
    if any(not math.isfinite(x) for x in (value, original, init)) or original == init:
        return None
    return (value - init) / (original - init)


# ------------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no global backend state)
# ------------------------------------------------------------------------------------------------
def _figure(ncols: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, axes


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_training_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                         keys: Sequence[str] = ("loss", "lr")) -> Path:
    """One panel per key (`loss`, `lr`, ...), one line per run; rows are `{"step": s, key: value}`."""
    figure, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for index, (label, rows) in enumerate(curves.items()):  # one colour per run across panels
            points = [(row["step"], row[key]) for row in rows if key in row and row[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label, color=f"C{index % 10}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"training {key}")
        ax.grid(alpha=0.3)
        values = [row[key] for rows in curves.values() for row in rows if key in row]
        if key != "lr" and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(figure, path)


def plot_layer_depth(runs: Sequence["RunRecord"], path: str | Path, metric: str = "bpb") -> Path | None:
    """AIM depth vs final `metric`, training time and peak memory (runs with a depth only)."""
    from matplotlib.ticker import MaxNLocator

    runs = sorted((r for r in runs if r.n_layers is not None and r.final.get(metric) is not None),
                  key=lambda r: r.n_layers)
    if not runs:
        return None
    figure, axes = _figure(3, width=4.4)
    panels = ((f"final {metric}", lambda r: r.final.get(metric)),
              ("training wall-clock (s)", lambda r: r.metrics.get(TIME_METRIC)),
              ("peak memory (MB)", lambda r: r.metrics.get(MEMORY_METRIC)))
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group_label, []).append(run)
    for ax, (title, get) in zip(axes, panels):
        for group, members in groups.items():
            xy = [(run.n_layers, get(run)) for run in members if get(run) is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=group)
        ax.set_xlabel("AIM depth (n_layers)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for name, style in (("original", "--"), ("init", ":")):  # reference lines on the final-metric panel
        value = next((r.models[name][metric] for r in runs if metric in r.models.get(name, {})), None)
        if value is not None:
            axes[0].axhline(value, linestyle=style, color="grey", label=name)
    axes[0].legend(fontsize="small")
    return _save(figure, path)


def plot_methods(rows: Sequence["TableRow"], path: str | Path, metric: str = "bpb") -> Path | None:
    """A bar per table row for `metric` (original, init, trained runs)."""
    bars = [(row.method, row.values[metric], row.kind) for row in rows if row.values.get(metric) is not None]
    if not bars:
        return None
    figure, axes = _figure(1, width=max(5.0, 0.9 * len(bars) + 2))
    ax = axes[0]
    labels, values, kinds = zip(*bars)
    ax.bar(range(len(values)), values, color=["tab:blue" if kind == "trained" else "grey" for kind in kinds])
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per method" + (" (lower is better)" if metric_direction(metric) == -1 else ""))
    low, high = min(values), max(values)
    spread = high - low + 1e-9
    ax.set_ylim(max(0.0, low - 0.15 * spread - 0.05 * abs(low)), high + 0.1 * spread + 0.02 * abs(high))
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------
# MLflow runs -> records -> table rows
# ------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """What the report needs from one MLflow run of the transfer recipe."""

    run_id: str
    name: str
    status: str
    label: str
    model: str
    init: str
    n_layers: int | None
    metrics: dict[str, float]
    items: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per model (`original` / `init` / `final`) the per-item credit lists of `eval/results.json`."""

    @property
    def models(self) -> dict[str, dict[str, float]]:
        """`{"original": {...}, "init": {...}, "final": {...}}` from the prefixed metrics."""
        grouped: dict[str, dict[str, float]] = {}
        for key, value in self.metrics.items():
            prefix, _, name = key.partition("/")
            if prefix in ("original", "init", "final") and name:
                grouped.setdefault(prefix, {})[name] = value
        return grouped

    @property
    def final(self) -> dict[str, float]:
        return self.models.get("final", {})

    @property
    def group_label(self) -> str:
        """The label without the depth (lines of the depth plot)."""
        return " ".join(part for part in self.label.split() if not (part.startswith("L") and part[1:].isdigit()))


@dataclass
class TableRow:
    method: str
    kind: str
    """original | init | trained"""
    model: str
    values: dict[str, float]
    n_layers: int | None = None
    wall_clock_s: float | None = None
    peak_memory_mb: float | None = None
    baseline: dict[str, float] = field(default_factory=dict)
    """The original model's metrics this row is compared with (`% of original`)."""
    run_id: str = ""
    init_values: dict[str, float] = field(default_factory=dict)
    """The initialisation of the same run (`recovery %`, `Δ vs init`)."""
    items: dict[str, list[float]] = field(default_factory=dict)
    init_items: dict[str, list[float]] = field(default_factory=dict)


def load_runs(tracking_uri: str, experiment_name: str, *, include_failed: bool = False) -> list[RunRecord]:
    """Transfer runs of `experiment_name` (oldest first); FINISHED only unless `include_failed`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise ValueError(f"experiment_name={experiment_name!r}: no such MLflow experiment in {tracking_uri}; "
                         f"experiments there: {known}")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`matt.kind` = 'transfer'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    records = []
    for run in runs:
        if run.info.status != "FINISHED" and not include_failed:
            logger.info("Skipping run %s (%s)", run.info.run_id, run.info.status)
            continue
        tags, params = run.data.tags, run.data.params
        depth = params.get("resolved.n_layers") or tags.get("matt.n_layers")
        records.append(RunRecord(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, status=run.info.status,
            label=tags.get("matt.label", run.info.run_name or run.info.run_id), model=tags.get("matt.model", "?"),
            init=tags.get("matt.init", "?"), n_layers=int(depth) if depth not in (None, "", "null") else None,
            metrics=dict(run.data.metrics), items=item_credits(client, run.info.run_id)))
    return records


def item_credits(client, run_id: str) -> dict[str, dict[str, list[float]]]:
    """Per-item credit lists of a run's `eval/results.json` artifact ({} when the run has none)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as directory:
        try:
            path = client.download_artifacts(run_id, "eval/results.json", directory)
        except (MlflowException, OSError):
            return {}
        models = json.loads(Path(path).read_text(encoding="utf-8")).get("models", {})
    return {model: {key: values for key, values in metrics.items() if key in UNIT_KEYS}
            for model, metrics in models.items()}


def _key(values: Mapping[str, float]) -> tuple:
    return tuple(sorted((k, round(v, 6)) for k, v in values.items() if k != "eval_seconds"))


def table_rows(runs: Iterable[RunRecord]) -> list[TableRow]:
    """Original models, initialisations and trained runs; identical evaluations (cached in sweeps)
    appear once. Each row's `baseline` is the original model evaluated in the same run (same text,
    same caps), else the first original of the same teacher."""
    runs = list(runs)
    first_original = {}
    for run in runs:
        if "original" in run.models:
            first_original.setdefault(run.model, run.models["original"])
    rows: list[TableRow] = []
    seen: set[tuple] = set()
    trained = []
    for run in runs:
        models = run.models
        baseline = models.get("original") or first_original.get(run.model, {})
        init_values = models.get("init", {})
        init_items = run.items.get("init", {})
        for kind, method in (("original", f"original ({run.model})"), ("init", f"{run.init} init")):
            if kind not in models:
                continue
            # the original model does not depend on the run's init: one row per identical evaluation
            identity = (kind, run.model, run.init if kind == "init" else "", _key(models[kind]))
            if identity not in seen:
                seen.add(identity)
                rows.append(TableRow(method, kind, run.model, dict(models[kind]), baseline=baseline, run_id=run.run_id,
                                     init_values=init_values, items=run.items.get(kind, {}), init_items=init_items))
        if "final" in models:
            trained.append(TableRow(run.label, "trained", run.model, models["final"], n_layers=run.n_layers,
                                    wall_clock_s=run.metrics.get(TIME_METRIC),
                                    peak_memory_mb=run.metrics.get(MEMORY_METRIC), baseline=baseline,
                                    run_id=run.run_id, init_values=init_values, items=run.items.get("final", {}),
                                    init_items=init_items))
    return rows + trained


def paired_difference(metric: str, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> PairedDifference | None:
    """`metric` of one model minus another's on the same units with a 95 % bootstrap interval,
    from their per-unit lists (`UNIT_KEYS`): items for accuracies (`paired_bootstrap`), documents
    for bits per byte (`ratio_bootstrap`: Σ bits / Σ bytes). None without matching lists."""
    if metric in ITEM_KEYS:
        a, b = mine.get(ITEM_KEYS[metric]), theirs.get(ITEM_KEYS[metric])
        return paired_bootstrap(a, b) if a and b and len(a) == len(b) else None
    if metric in DOCUMENT_KEYS:
        bits, size = DOCUMENT_KEYS[metric]
        a, b, weights = mine.get(bits), theirs.get(bits), mine.get(size)
        if a and b and weights and len(a) == len(b) == len(weights) and list(weights) == list(theirs.get(size) or []):
            return ratio_bootstrap(a, weights, b)
    return None


def format_difference(diff: PairedDifference) -> str:
    """"+0.0500 [+0.0100, +0.0900] *": `*` when the 95 % interval excludes 0."""
    return f"{diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]" + (" *" if diff.significant else "")


def difference_to_init(row: TableRow, metric: str) -> str | None:
    """`Δ vs init` of an accuracy or bits per byte: "+0.0500 [+0.0100, +0.0900] *" (paired bootstrap
    over the same items / documents, `paired_difference`; `*` = the 95 % interval excludes 0), or
    with per-unit lists missing, the difference with `*` only when the two Wilson intervals do not
    overlap. None for the init row itself or without the numbers."""
    if row.kind == "init" or metric not in row.values or metric not in row.init_values:
        return None
    diff = paired_difference(metric, row.items, row.init_items)
    if diff is not None:
        return format_difference(diff)
    bounds = [tuple(values.get(f"{metric}{s}") for s in CI_SUFFIXES) for values in (row.values, row.init_values)]
    if any(None in b for b in bounds):
        return None
    difference = row.values[metric] - row.init_values[metric]
    return f"{difference:+.4f} (Wilson)" + ("" if intervals_overlap(*bounds) else " *")


def table_columns(rows: Sequence[TableRow], metrics: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells (numbers stay numbers) of the comparison table (see the module docstring)."""
    shown = [m for m in metrics if any(m in row.values for row in rows)]
    with_interval = {m for m in shown if any(f"{m}{CI_SUFFIXES[0]}" in row.values for row in rows)}
    header = ["method", "model", "n_layers"]
    for metric in shown:
        header.append(metric)
        if metric in with_interval:
            header.append(f"{metric} 95% CI")
        if metric_direction(metric) is not None:
            header += [f"{metric} % of original", f"{metric} recovery %"]
        if metric in with_interval:
            header.append(f"{metric} Δ vs init")
    header += ["train time (s)", "peak memory (MB)", "run"]
    cells = []
    for row in rows:
        line: list[Any] = [row.method, row.model, row.n_layers]
        for metric in shown:
            value = row.values.get(metric)
            line.append(value)
            if metric in with_interval:
                low, high = (row.values.get(f"{metric}{s}") for s in CI_SUFFIXES)
                line.append(None if low is None or high is None else f"[{low:.4f}, {high:.4f}]")
            if metric_direction(metric) is not None:
                line.append(percent_of_baseline(metric, value, row.baseline.get(metric)))
                share = recovery(value, row.baseline.get(metric), row.init_values.get(metric))
                line.append(None if share is None else 100.0 * share)
            if metric in with_interval:
                line.append(difference_to_init(row, metric))
        line += [row.wall_clock_s, row.peak_memory_mb, row.run_id[:8]]
        cells.append(line)
    return header, cells


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in cells]
    return "\n".join(lines)


LOSS_KEYS = ("train/aim_loss", "train/ntp_loss")
PROBE_KEYS = ("train_s", "heldout_bpb", "heldout_bpb_new", "heldout_bpb_shared", "heldout_aim_cosine_new",
              "heldout_aim_cosine_shared", "heldout_aim_mse_new", "heldout_aim_mse_shared", "row_change",
              "head_row_change", "row_norm")


def metric_histories(client, runs: Sequence[RunRecord], keys: Sequence[str], *, skip_all_zero: bool = False,
                     measured_by: str | None = None) -> dict[str, list[dict]]:
    """`{label: [{"step": s, name: value, ...}, ...]}` by step from the MLflow histories of `keys`
    (each named without its `prefix/`). `skip_all_zero`: a key a run logged only as 0 (a loss term
    it does not use: AIM in the NTP baseline, NTP in AIM-only runs) is left out of its rows.
    `measured_by`: only the steps that have this key (the probe's `train_s`), and no runs without any."""
    curves: dict[str, list[dict]] = {}
    for run in runs:
        by_step: dict[int, dict] = {}
        for key in keys:
            history = client.get_metric_history(run.run_id, key)
            if skip_all_zero and not any(m.value for m in history):
                continue
            for m in history:
                by_step.setdefault(m.step, {"step": m.step})[key.split("/", 1)[-1]] = m.value
        rows = [by_step[step] for step in sorted(by_step) if measured_by is None or measured_by in by_step[step]]
        if rows or measured_by is None:
            curves[run.label if run.label not in curves else f"{run.label} ({run.run_id[:6]})"] = rows
    return curves


def plot_budget_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                       reference: Mapping[str, float] | None = None) -> Path:
    """Budget curves: held-out bits per byte (all bytes; bytes under new tokens), held-out AIM
    cosine loss on pairs with new tokens (solid) / shared only (dashed), and how far the new rows
    moved (input solid, LM head dashed), each against training seconds; one colour per run.
    `reference`: horizontal lines (e.g. `{"original": 0.71}`) on the bits-per-byte panel."""
    panels = (("held-out bits per byte", (("heldout_bpb", "-"),)),
              ("held-out bits per byte, new-token bytes", (("heldout_bpb_new", "-"),)),
              ("held-out AIM cosine: new pairs (—), shared (--)", (("heldout_aim_cosine_new", "-"),
                                                                   ("heldout_aim_cosine_shared", "--"))),
              ("row change ‖w−w₀‖/‖w₀‖: input (—), head (--)", (("row_change", "-"), ("head_row_change", "--"))))
    figure, axes = _figure(len(panels), width=4.6)
    for ax, (title, series) in zip(axes, panels):
        for index, (label, rows) in enumerate(curves.items()):
            for key, style in series:
                points = [(row["train_s"], row[key]) for row in rows if row.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, color=f"C{index % 10}",
                            label=label if style == "-" else None)
        ax.set_xlabel("training time (s)")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    for name, value in (reference or {}).items():
        axes[0].axhline(value, linestyle=":", color="grey", label=name)
    axes[0].legend(fontsize="x-small")
    return _save(figure, path)


def budget_table(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """Markdown: one line per (run, measurement) with the budget-curve numbers."""
    keys = [k for k in PROBE_KEYS if any(k in row for rows in curves.values() for row in rows)]
    header = ["method", "step", *keys]
    cells = [[label, int(row["step"]), *(row.get(k) for k in keys)] for label, rows in curves.items() for row in rows]
    return markdown_table(header, cells)


def build_report(tracking_uri: str, experiment_name: str, output_dir: str | Path, *,
                 metrics: Sequence[str] = ("bpb", "bpb_new", "bpb_shared", "choice_accuracy", "choice_accuracy_pmi",
                                           "chrf", "bytes_per_token"),
                 include_failed: bool = False) -> dict[str, Path]:
    """Write `table.md`, `table.csv` and the PNG plots for an experiment; returns their paths by file name."""
    from mlflow import MlflowClient

    runs = load_runs(tracking_uri, experiment_name, include_failed=include_failed)
    if not runs:
        raise ValueError(f"No finished transfer runs in MLflow experiment {experiment_name!r} ({tracking_uri})")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    header, cells = table_columns(rows, metrics)
    markdown = markdown_table(header, cells)
    (output_dir / "table.md").write_text(f"# {experiment_name}\n\n{markdown}\n", encoding="utf-8")
    with (output_dir / "table.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *(["" if v is None else v for v in line] for line in cells)])
    written = [output_dir / "table.md", output_dir / "table.csv"]
    client = MlflowClient(tracking_uri=tracking_uri)
    curves = metric_histories(client, runs, LOSS_KEYS, skip_all_zero=True)
    if any(curves.values()):
        keys = [key for key in ("aim_loss", "ntp_loss") if any(key in row for rows in curves.values() for row in rows)]
        written.append(plot_training_curves(curves, output_dir / "loss_curves.png", keys=keys))
    budget = metric_histories(client, runs, [f"diag/{key}" for key in PROBE_KEYS], measured_by="train_s")
    if budget:
        budget_md = output_dir / "budget.md"
        budget_md.write_text(f"# {experiment_name}: held-out measurements during training\n\n{budget_table(budget)}\n",
                             encoding="utf-8")
        written += [plot_budget_curves(budget, output_dir / "budget_curves.png"), budget_md]
    written += [plot_layer_depth(runs, output_dir / "layer_depth.png"), plot_methods(rows, output_dir / "methods.png")]
    print(f"\n# {experiment_name} ({len(runs)} runs)\n\n{markdown}\n\nWritten to {output_dir}", flush=True)
    return {path.name: path for path in written if path is not None}

