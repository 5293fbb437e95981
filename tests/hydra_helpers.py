"""Shared by the Hydra test files: load a recipe of experiments/, run it in-process without leaking its
logging setup."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from pathlib import Path


def run_app(app, args):
    """Run a Hydra entry point in-process, then undo Hydra's logging setup (its handlers hold the
    streams of the test that ran it; left in place they log into closed files later)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return app(args)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


RECIPES = Path(__file__).resolve().parents[1] / "experiments"


@functools.cache
def recipe(name: str):
    """`experiments/<name>.py` loaded as a module (the recipes are scripts, not a package); its
    `main(argv)` runs the Hydra app in-process, as `python experiments/<name>.py ...` does."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickling and dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module
