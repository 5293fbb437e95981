"""Console scripts declared in pyproject: `matt-transfer`, `matt-evaluate`, `matt-report`.

Each runs its recipe, `experiments/<name>.py` of this source checkout, as a script (`runpy`, as
`python experiments/<name>.py ...` would), so they take the same Hydra command lines."""

from __future__ import annotations

import functools
import runpy
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "experiments"


def _run(name: str) -> None:
    path = RECIPES / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"No recipe {path}: the console scripts run experiments/{name}.py of a source "
                                "checkout of the project (pip install -e .)")
    runpy.run_path(str(path), run_name="__main__")


transfer = functools.partial(_run, "transfer")
evaluate = functools.partial(_run, "evaluate")
report = functools.partial(_run, "report")
