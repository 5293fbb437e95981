"""Shared by the Hydra test files: run an entry point in-process without leaking its logging setup."""

from __future__ import annotations

import logging


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
