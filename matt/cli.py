"""Console scripts declared in pyproject: `matt-transfer`, `matt-evaluate`, `matt-report`.

They take Hydra command lines, exactly like `python experiments/<name>.py ...`."""

from __future__ import annotations


def transfer() -> None:
    from matt.hydra_app import transfer as main

    main()


def evaluate() -> None:
    from matt.hydra_app import evaluate as main

    main()


def report() -> None:
    from matt.hydra_app import report as main

    main()
