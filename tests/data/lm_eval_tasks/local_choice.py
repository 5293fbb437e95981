"""Dataset loader of the offline test task: reads the jsonl next to this file (no Hub access)."""

from pathlib import Path

import datasets


def load(**kwargs):
    # lm-eval passes the task's metadata (version, ...) as keyword arguments; nothing here needs it.
    path = Path(__file__).with_name("local_choice.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})
