"""The steps of the recipes (`experiments/transfer.py`, `evaluate.py`), one module per step; the
module map with one line per module is in docs/DESIGN.md."""
