"""Validate a composed transfer config before any heavy work, naming the key and the allowed values.

Hydra already rejects unknown keys and enum values outside their choices while composing (against
`matt.pipeline.config`). The checks here need more than the config, yet stay cheap (no weights are
loaded, no tokenizer is trained): mandatory values and MATTConfig's ranges; path-like values that do
not exist locally (never sent to the Hub); the tracking store (answers within seconds, writable); the
tokenizers (fast, for offsets; the teacher's fits the embedding matrix); `model.family` against the
checkpoint's `model_type`; `objective.n_layers` within the depth; `init.checkpoint` against the model
width; the data source, its `data.text_column` and the evaluated / probed splits.

Everything loaded here is returned in a `Plan`, so the recipe does not load it twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from matt.pipeline.config import matt_config

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What preflight loaded and decided (reused by the recipe)."""

    teacher_tokenizer: Any
    model_config: Any
    documents: Any
    n_layers: int
    depth: int
    hidden_size: int
    with_ntp: bool
    student_tokenizer: Any | None = None
    """Loaded here only for `tokenizer=pretrained` (trained ones are built by the recipe)."""

    def summary(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "depth": self.depth, "hidden_size": self.hidden_size,
                "with_ntp": self.with_ntp, "teacher_vocab": len(self.teacher_tokenizer),
                "documents": self.documents.summary(), "model_type": self.model_config.model_type}


def check_missing(cfg) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"Missing mandatory value(s): {', '.join(missing)} - set them on the command line, "
                         f"e.g. {missing[0]}=...")


def check_tracking(tracking_cfg, output_root) -> None:
    """The tracking store is configured, answers within seconds and can be written."""
    from matt.tracking import check_store

    if tracking_cfg.backend != "mlflow":
        return
    if tracking_cfg.require_uri and not tracking_cfg.uri:
        raise ValueError("tracking=mlflow_server needs tracking.uri=<http://host:port> (or MLFLOW_TRACKING_URI in "
                         "the environment); use tracking=mlflow for the embedded sqlite store")
    if tracking_cfg.uri:
        check_store(str(tracking_cfg.uri), "tracking.uri")
    else:
        database = Path(str(output_root)).expanduser().resolve() / "mlflow.db"
        check_store(f"sqlite:///{database}", "paths.output_root (the embedded store)")


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz", ".safetensors", ".model")


def looks_like_local_path(value: str) -> bool:
    """A value only a local path can mean: absolute, `./` `../` `~`, backslashes, more than one `/`
    (hub ids are `name` or `owner/name`) or a file suffix. Such a value is never sent to the Hub."""
    return (value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value
            or value.count("/") > 1 or value.lower().endswith(LOCAL_SUFFIXES))


def check_local_path(value, key: str) -> None:
    """Raise naming `key` when `value` looks like a local path that does not exist."""
    if value is None:
        return
    text = str(value)
    if looks_like_local_path(text) and not Path(text).expanduser().exists():
        raise ValueError(f"{key}={text!r} does not exist (a local path; it is not looked up on the Hugging Face "
                         "Hub). Fix the path, or give a hub id as `name` or `owner/name`")


def check_local_paths(cfg) -> None:
    """Path-like values that do not exist fail now, not after 30-50 s of Hub retries."""
    if cfg.model.tiny is None:
        check_local_path(cfg.model.pretrained, "model.pretrained")
        check_local_path(cfg.model.tokenizer, "model.tokenizer")
    if cfg.tokenizer.source == "pretrained":
        check_local_path(cfg.tokenizer.path, "tokenizer.path")
    data_path = str(cfg.data.path)
    if cfg.data.format != "hub" and not data_path.startswith("builtin:"):
        check_local_path(data_path, "data.path")


def check_vocab_fits(model_cfg, teacher_tokenizer, decoder) -> None:
    """Every teacher token id has an embedding row (else the run would fail after it started)."""
    rows = getattr(decoder, "vocab_size", None)
    if rows is not None and len(teacher_tokenizer) > int(rows):
        source = model_cfg.tokenizer or model_cfg.pretrained
        raise ValueError(f"model.tokenizer ({source!r}) has {len(teacher_tokenizer)} tokens, but the model "
                         f"{model_cfg.pretrained!r} has only {rows} embedding rows (vocab_size): use the model's own "
                         "tokenizer (unset model.tokenizer) or a checkpoint with resized embeddings")


def check_family(model_cfg, model_config=None) -> None:
    """`model.family` is a registered family and (given the checkpoint's config) covers its model_type."""
    from matt.modeling.registry import FAMILIES, family_of, supported_model_types

    family = model_cfg.family
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is invalid: choose one of {list(FAMILIES)} (or register an "
                         "adapter for a new family: README 'Adding a model family')")
    model_type = getattr(model_config, "model_type", None)
    if model_config is not None and model_type not in FAMILIES[family].model_types:
        owner = family_of(model_type)
        hint = f" (that is family {owner!r})" if owner else f"; supported model types: {supported_model_types()}"
        raise ValueError(f"model.family={family!r} does not match the checkpoint {model_cfg.pretrained!r}, whose "
                         f"model_type is {model_type!r}{hint}; allowed families: {list(FAMILIES)}")


def check_n_layers(cfg, depth: int) -> int:
    """`objective.n_layers` resolved for a model of `depth` layers (None: about a third) and checked."""
    from matt.modeling.base import default_n_layers

    n_layers = default_n_layers(depth) if cfg.objective.n_layers is None else int(cfg.objective.n_layers)
    if not 1 <= n_layers <= depth:
        raise ValueError(f"objective.n_layers={n_layers} is invalid for {cfg.model.name} with {depth} layers: "
                         f"choose an integer in [1, {depth}] (the AIM layer is n_layers - 1)")
    return n_layers


def check_eval(eval_cfg, documents) -> None:
    if not eval_cfg.enabled:
        return
    documents.split(eval_cfg.split)  # raises naming eval.split / data.*_split
    if eval_cfg.lm_eval.enabled and not eval_cfg.lm_eval.tasks:
        raise ValueError("eval.lm_eval.enabled=true needs eval.lm_eval.tasks=[task, ...]")


def check_probe(cfg, documents) -> None:
    """The `probe` group: a held-out split that exists, measurement points at logged steps."""
    pc = cfg.probe
    if not pc.enabled:
        return
    if not any(documents.split(pc.split)["text"]):  # names data.*_split when the split is absent
        raise ValueError(f"probe.split='{pc.split}' has no non-empty documents to measure on")
    if pc.every_n_steps is not None and (pc.every_n_steps < 1 or pc.every_n_steps % cfg.train.log_every_n_steps):
        raise ValueError(f"probe.every_n_steps={pc.every_n_steps} must be a positive multiple of "
                         f"train.log_every_n_steps={cfg.train.log_every_n_steps} (the probe runs at logged steps)")
    if pc.every_s is not None and not pc.every_s > 0:
        raise ValueError(f"probe.every_s={pc.every_s} must be positive (or null: start and end only)")
    if pc.aim_batches < 0:
        raise ValueError(f"probe.aim_batches={pc.aim_batches} must be >= 0")


def check_init_checkpoint(init_cfg, hidden_size: int, student_tokenizer=None) -> None:
    """`init.checkpoint` holds embeddings of the model's width (and, once known, the student's vocabulary size)."""
    if init_cfg.method != "checkpoint":
        return
    from matt.result import EMBEDDINGS_FILE, TransferResult

    if not init_cfg.checkpoint:
        raise ValueError("init=checkpoint needs init.checkpoint=<embeddings.safetensors or a directory holding one>")
    where = f"init.checkpoint={init_cfg.checkpoint!r}"
    path = Path(str(init_cfg.checkpoint)).expanduser()
    if not (path.is_file() or (path / EMBEDDINGS_FILE).is_file()):
        raise ValueError(f"{where}: no {EMBEDDINGS_FILE} there (give the file or the directory of a previous run's "
                         "embeddings)")
    rows, width = TransferResult.load(path).input_embeddings.shape
    if width != hidden_size:
        raise ValueError(f"{where}: embeddings of width {width}, but the model's hidden size is {hidden_size} "
                         "(teacher/student architecture mismatch: they were learned for another model)")
    if student_tokenizer is not None and rows != len(student_tokenizer):
        raise ValueError(f"{where}: {rows} embedding rows, but the student tokenizer has {len(student_tokenizer)} "
                         "tokens (they were learned for another tokenizer)")


def preflight(cfg) -> Plan:
    """Validate the transfer config `cfg`; raise `ValueError` naming the offending key."""
    from matt.pipeline.documents import load_documents
    from matt.pipeline.models import load_model_config, load_teacher_tokenizer
    from matt.pipeline.tokenizer import load_pretrained_student
    from matt.segmentation import check_offsets_support

    check_missing(cfg)
    check_local_paths(cfg)
    matt_config(cfg)  # MATTConfig's ranges and combinations, reported under their Hydra keys
    check_tracking(cfg.tracking, cfg.paths.output_root)
    check_family(cfg.model)  # before a tiny model's config is built from it

    teacher_tokenizer = load_teacher_tokenizer(cfg.model)
    teacher_source = cfg.model.tokenizer or cfg.model.pretrained
    check_offsets_support(teacher_tokenizer, f"model.tokenizer (the teacher's, {teacher_source!r})")
    model_config = load_model_config(cfg.model, teacher_tokenizer)
    check_family(cfg.model, model_config)  # the family covers the model_type: an adapter exists
    decoder = model_config.get_text_config()  # multimodal checkpoints keep the decoder's config apart
    depth, hidden = int(decoder.num_hidden_layers), int(decoder.hidden_size)
    check_vocab_fits(cfg.model, teacher_tokenizer, decoder)
    n_layers = check_n_layers(cfg, depth)

    student_tokenizer = None
    if cfg.tokenizer.source == "pretrained":  # names a missing tokenizer.path or a slow tokenizer
        student_tokenizer = load_pretrained_student(cfg.tokenizer)
    check_init_checkpoint(cfg.init, hidden, student_tokenizer)

    documents = load_documents(cfg.data, teacher_tokenizer)
    check_eval(cfg.eval, documents)
    check_probe(cfg, documents)
    plan = Plan(teacher_tokenizer=teacher_tokenizer, model_config=model_config, documents=documents,
                n_layers=n_layers, depth=depth, hidden_size=hidden, with_ntp=bool(cfg.objective.with_ntp),
                student_tokenizer=student_tokenizer)
    logger.info("Preflight OK: %s", plan.summary())
    return plan
