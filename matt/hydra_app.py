"""Hydra plumbing of the recipes (`experiments/transfer.py`, `evaluate.py`, `report.py`): the config
directory, MATT's resolvers and schemas, `hydra_main` (a task -> a Hydra app callable with an argv),
one run-directory stamp for all processes of a distributed launch, SIGTERM as a clean stop.

Resolvers available in configs:
- `${matt_asset:NAME}` - local path of an offline asset (`matt.assets.resolve`, imported lazily).
- `${matt_stamp:}` - the run directory's name: a timestamp plus a short random suffix
  (`2025-01-31_12-00-00_3f9a1c`), so two jobs started in the same second never share a directory;
  identical in every process of an `accelerate launch` (`share_run_stamp_across_processes`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from matt.pipeline.config import register_configs
from matt.pipeline.run_context import STAMP_ENV, distributed_on_cpu, new_run_stamp, run_stamp
from matt.tracking import Terminated

CONFIG_DIR_ENV = "MATT_CONFIG_DIR"


# ------------------------------------------------------------------------------------------------
# config directory and resolvers
# ------------------------------------------------------------------------------------------------
def config_dir() -> Path:
    """`$MATT_CONFIG_DIR`, else the `configs/` directory of this source checkout."""
    candidate = Path(os.environ.get(CONFIG_DIR_ENV) or Path(__file__).resolve().parents[1] / "configs")
    if not (candidate / "transfer.yaml").is_file():
        raise FileNotFoundError(
            f"No MATT Hydra configs at {candidate}. Run from a source checkout of the project, or point "
            f"{CONFIG_DIR_ENV} at a copy of its configs/ directory."
        )
    return candidate


def _asset_path(name: str) -> str:
    try:
        from matt.assets import resolve

        return str(resolve(name))
    except Exception as exc:
        raise RuntimeError(
            f"The offline asset {name!r} is not available: {exc}. Fetch the assets with `make assets`, or "
            "override the key with a local path or a hub id "
            "(e.g. model.pretrained=HuggingFaceTB/SmolLM2-135M-Instruct)."
        ) from exc


def setup() -> Path:
    """Everything Hydra needs before composing a MATT config (resolvers, schemas; idempotent); returns
    the config directory."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("matt_asset"):
        OmegaConf.register_new_resolver("matt_asset", _asset_path, use_cache=True)
    if not OmegaConf.has_resolver("matt_stamp"):
        OmegaConf.register_new_resolver("matt_stamp", run_stamp, use_cache=True)
    register_configs()
    return config_dir()


def share_run_stamp_across_processes() -> None:
    """Under `accelerate launch`/torchrun, make every rank use rank 0's run-directory stamp.

    Hydra names the run directory before our code runs, from `${matt_stamp:}`; without this the
    ranks could pick different seconds and write to different directories."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get(STAMP_ENV):
        return
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=distributed_on_cpu())
    stamp = [new_run_stamp() if state.is_main_process else None]
    broadcast_object_list(stamp, from_process=0)
    os.environ[STAMP_ENV] = stamp[0]


# ------------------------------------------------------------------------------------------------
# Hydra mains
# ------------------------------------------------------------------------------------------------
def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Decorator: `task(cfg)` -> `main(argv=None)`, the Hydra app of `configs/<config_name>.yaml`
    running `task` (argv None: `sys.argv`, as on the command line; else these arguments, in-process)."""
    def decorate(task: Callable[[Any], Any]) -> Callable[..., Any]:
        @functools.wraps(task)
        def main(argv: Sequence[str] | None = None) -> None:
            import hydra

            app = hydra.main(version_base="1.3", config_path=str(setup()), config_name=config_name)(task)
            saved = sys.argv
            if argv is not None:
                sys.argv = [saved[0] if saved else config_name, *argv]
            try:
                return app()
            finally:
                sys.argv = saved

        return main

    return decorate


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"received signal {signum} (SIGTERM)")


@contextlib.contextmanager
def sigterm_stops_the_job() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's preemption, `kill`) stops a job as Ctrl-C does: emergency
    checkpoint, MLflow run KILLED, instead of dying with the run left RUNNING and the last steps lost."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def compose(config_name: str = "transfer", overrides: Sequence[str] = ()):
    """The composed (unresolved) config, as Hydra would build it, without running anything.

    Handy in notebooks and tests: `compose("transfer", ["experiment=smoke"])`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    directory = setup()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
