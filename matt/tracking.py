"""Experiment tracking: one MLflow run per job, written by the main process only.

`open_tracker` gives every process a `Tracker`; only the main process of a distributed launch gets
a real `MLflowTracker`, the others a no-op one, so code calls `tracker.log_metrics(...)`
unconditionally. `MLflowTracker` talks to MLflow through `MlflowClient` (no global "active run"
state, so several runs in one Python process - Hydra multirun with the basic launcher - cannot
leak into each other).

Where runs go: `uri=None` means an embedded sqlite file `<output_root>/mlflow.db` with artifacts
in `<output_root>/mlartifacts/`; an explicit `sqlite:///<path>` keeps its artifacts next to the
database as well (`<path's directory>/mlartifacts/`); any other MLflow URI (e.g.
`http://127.0.0.1:5000`) is used as is. `check_store` (run by preflight) tells within seconds whether
the store can be reached or written. A sqlite store is opened under a file lock, so parallel jobs
that find it fresh do not race through its schema migration.

Crashes and resumption: `run()` used as a context manager ends the run FINISHED, or FAILED with
the exception recorded (tag `matt.error`, artifact `error/traceback.txt`; Ctrl-C or SIGTERM ends it KILLED).
If the store itself fails while recording that, the original exception is still what propagates.
The run id is written to `<checkpoint_dir>/mlflow_run.json` as soon as the run exists, so a
resumed job (`train.resume=true` in the same output directory) reopens the SAME run; there, a
metric point already in the run (the steps re-run after a crash) is not logged a second time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value (longer values are cut, with a warning)."""
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")
STORE_CHECK_TIMEOUT_S = 5.0
"""How long preflight waits for a tracking server to answer."""
STORE_LOCK_TIMEOUT_S = 300.0
"""How long a job waits for another one to finish initialising a sqlite store."""
SQLITE_PREFIX = "sqlite:///"


class Terminated(BaseException):
    """The job received SIGTERM (raised by the entry points' signal handler): its run ends KILLED."""


def default_tracking_uri(output_root: str | Path) -> str:
    """The embedded store: `sqlite:///<abs output_root>/mlflow.db`."""
    root = Path(output_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths against the current directory)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX):].split("?", 1)[0]).expanduser().resolve()


def _writable_directory(directory: Path) -> bool:
    """`directory` exists and is writable, or can be created (its nearest existing parent is writable)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def check_store(uri: str, key: str = "tracking.uri", timeout: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Raise `ValueError` naming `key` and `uri` when the tracking store cannot be used: an HTTP(S)
    server that does not answer within `timeout` seconds, or a sqlite / file store that cannot be
    written. Other schemes (databricks, postgresql, ...) are left to MLflow."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered: the server is there (auth and routes are MLflow's business)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ValueError(f"{key}={uri!r}: the MLflow tracking server does not answer within {timeout:g} s "
                             f"({reason}). Start it, fix the URI, or use tracking=mlflow (embedded sqlite store) / "
                             "tracking=none") from exc
        return
    database = sqlite_path(uri)
    if database is not None:
        if database.exists() and not os.access(database, os.R_OK | os.W_OK):
            raise ValueError(f"{key}={uri!r}: the sqlite store {database} is not readable and writable")
        if not _writable_directory(database.parent):
            raise ValueError(f"{key}={uri!r}: cannot create or write the sqlite store in {database.parent} "
                             "(read-only or missing permissions); choose another location")
        return
    if scheme in ("", "file"):
        directory = Path(urllib.parse.urlparse(uri).path if scheme == "file" else uri).expanduser().resolve()
        if not _writable_directory(directory):
            raise ValueError(f"{key}={uri!r}: the file store {directory} cannot be created or written")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `<database>.lock` for a sqlite URI (nothing for other stores): MLflow migrates a fresh
    sqlite schema on first use, and two jobs doing that at once crash one of them."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(database) + ".lock", timeout=STORE_LOCK_TIMEOUT_S):
        yield


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, `_-. /:`); anything else becomes `_`."""
    return _METRIC_NAME.sub("_", name)


def numeric_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The int and float values (not bools) of `values` as metrics named `<prefix><key>`."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists stay one value (JSON), None becomes "null"."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value), default=str)
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = str(value)  # an empty mapping too: "{}"
    return flat


def git_commit(path: str | Path | None = None) -> tuple[str, bool]:
    """(commit hash, dirty) of the git checkout holding `path` (this package by default)."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


# ------------------------------------------------------------------------------------------------
class Tracker:
    """The no-op tracker (non-main processes, `tracking=none`); also the interface."""

    run_id: str | None = None
    tracking_uri: str | None = None
    resumed: bool = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass

    def training_logger(self, prefix: str = "train/"):
        """A `matt.trainer` log function: metrics of step `s` logged as `<prefix><name>` at step `s`."""

        def log(metrics: Mapping[str, float], step: int) -> None:
            self.log_metrics({f"{prefix}{name}": value for name, value in metrics.items()}, step=step)

        return log

    @contextlib.contextmanager
    def run(self) -> Iterator["Tracker"]:
        """End the run FINISHED, or FAILED (KILLED on Ctrl-C) with the exception recorded."""
        try:
            yield self
        except BaseException as exc:
            self.fail(exc)
            raise
        else:
            self.finish()


class MLflowTracker(Tracker):
    """One MLflow run, created (or reopened with `run_id`) on construction."""

    def __init__(self, tracking_uri: str, experiment_name: str, *, run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None, run_id: str | None = None,
                 artifact_location: str | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        with store_lock(tracking_uri):  # the first use of a fresh store (the client opens it) creates its schema
            self.client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")  # raises if the run is gone
                self.run_id, self.resumed = run_id, True
                logger.info("Resuming MLflow run %s (%s)", run_id, tracking_uri)
            else:
                experiment_id = self._experiment_id(experiment_name, artifact_location)
                self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                logger.info("MLflow run %s in experiment %r (%s)", self.run_id, experiment_name, tracking_uri)
        self._finished = False
        self._logged_steps: dict[str, set[int]] = {}  # resumed runs: steps each metric already has
        self.set_tags(tags or {})

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment {name!r} is deleted in {self.tracking_uri}: restore it "
                                 "or choose another tracking.experiment_name")
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created by a parallel job in the meantime
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    # --- logging --------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run, keys already logged keep their first value (MLflow params
        are immutable) and changed ones are listed in the tag `matt.resume_changed_params`."""
        from mlflow.entities import Param

        values = {}
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_LENGTH:
                logger.warning("Param %s is %d characters long; logging its first %d", key, len(text), MAX_PARAM_LENGTH)
                text = text[:MAX_PARAM_LENGTH]
            values[key[:250]] = text
        if self.resumed:
            existing = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
            if changed:
                logger.info("Resumed run: params %s differ from the first attempt; keeping the first values", changed)
                self.set_tags({"matt.resume_changed_params": ",".join(changed)[:5000]})
            values = {k: v for k, v in values.items() if k not in existing}
        # MlflowClient.log_batch splits what it is given into requests within MLflow's batch limits
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for name, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                logger.warning("Metric %s=%r is not a number; not logged", name, value)
                continue
            if math.isnan(value):
                logger.warning("Metric %s is NaN; logged as NaN", name)
            if self.resumed and (step or 0) in self._steps_logged_before(metric_name(name)):
                continue  # re-run after a crash: the first attempt's point stands (no duplicate)
            items.append(Metric(metric_name(name), value, now, step or 0))
        self.client.log_batch(self.run_id, metrics=items)

    def _steps_logged_before(self, name: str) -> set[int]:
        """Steps of metric `name` already in a resumed run (read once per metric)."""
        if name not in self._logged_steps:
            self._logged_steps[name] = {m.step for m in self.client.get_metric_history(self.run_id, name)}
        return self._logged_steps[name]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    # --- end of run -----------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        if not self._finished:
            self.client.set_terminated(self.run_id, status=status)
            self._finished = True

    def fail(self, exc: BaseException) -> None:
        """Record `exc` and end the run; never raises (the store may be what failed), so the
        caller re-raises the first error, not a secondary one from the store."""
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED"
        logger.error("MLflow run %s ends %s: %s: %s", self.run_id, status, type(exc).__name__, exc)
        try:
            self.set_tags({"matt.error": f"{type(exc).__name__}: {exc}"})
            self.log_text("".join(traceback.format_exception(exc)), "error/traceback.txt")
        except Exception as store_exc:  # the store itself may be what failed; the status still matters most
            logger.error("Could not record the exception in MLflow run %s (%s: %s)", self.run_id,
                         type(store_exc).__name__, store_exc)
        try:
            self.finish(status)
        except Exception as store_exc:
            logger.error("Could not mark MLflow run %s %s (%s: %s); the run's error is the one above", self.run_id,
                         status, type(store_exc).__name__, store_exc)


# ------------------------------------------------------------------------------------------------
def save_run_reference(tracker: Tracker, directory: str | Path) -> Path | None:
    """Write `{run_id, tracking_uri}` next to the checkpoints (what a resumed job reopens)."""
    if tracker.run_id is None:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RUN_FILE
    path.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}, indent=2))
    return path


def load_run_reference(directory: str | Path) -> dict[str, str] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def open_tracker(tracking_cfg, *, output_root: str | Path, is_main_process: bool = True, run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None, resume_from: str | Path | None = None) -> Tracker:
    """The tracker of this process for the `tracking` config group; a run is tagged with the git
    commit (+ dirty flag) and host, then `tags`, then `tracking.tags`.

    `resume_from`: a checkpoint directory; if it holds a run reference, that run is reopened
    (and must live in the same tracking store)."""
    backend = getattr(tracking_cfg.backend, "value", tracking_cfg.backend)  # an enum member or its string
    if not is_main_process or backend == "none":
        return Tracker()
    uri = tracking_cfg.uri or default_tracking_uri(output_root)
    database = sqlite_path(uri)  # its artifacts go next to it, not in ./mlruns of the current directory
    artifact_location = None if database is None else (database.parent / "mlartifacts").as_uri()
    run_id = None
    if resume_from is not None:
        reference = load_run_reference(resume_from)
        if reference is not None:
            if reference.get("tracking_uri") != uri:
                raise ValueError(
                    f"The checkpoint in {resume_from} belongs to MLflow run {reference['run_id']} in "
                    f"{reference.get('tracking_uri')}, but tracking.uri resolves to {uri}; resume with the same "
                    "tracking settings (or delete mlflow_run.json to start a new run)"
                )
            run_id = reference["run_id"]
    commit, dirty = git_commit()
    all_tags = {"mlflow.source.git.commit": commit, "matt.git_commit": commit, "matt.git_dirty": str(dirty).lower(),
                "matt.host": socket.gethostname(), **(tags or {}), **dict(tracking_cfg.tags or {})}
    return MLflowTracker(uri, tracking_cfg.experiment_name, run_name=run_name, tags=all_tags, run_id=run_id,
                         artifact_location=artifact_location)
