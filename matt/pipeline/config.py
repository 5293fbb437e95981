"""Structured configs (schemas) of the Hydra groups, registered in Hydra's ConfigStore.

The YAML files under `configs/` only fill these in. Because the primary configs are typed by the
root dataclasses below, Hydra validates every group option and every command-line override
against them while composing: a misspelt key, a value of the wrong type or an option outside an
enum fails before anything runs, with a message naming the full key (and, for enums, the
allowed values). Semantic checks that need more than the config (the model family, which
`register_adapter` can extend at runtime; layer depth of the model,
dataset columns, tokenizer offsets) are done by `matt.pipeline.preflight`.

No `from __future__ import annotations` here: OmegaConf reads the annotations at runtime.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from matt.choices import Choice, Precision
from matt.config import GROUPS, DataSettings, MATTConfig, ObjectiveSettings, TrainSettings


# ------------------------------------------------------------------------------------------------
# choices of the pipeline, `matt.choices.Choice`s like the training choices (`objective.loss=cosine`):
# str-valued, so `cfg.tokenizer.source == "extend"`; the names are what users type
# ------------------------------------------------------------------------------------------------
class TokenizerStyle(Choice):
    byte_level = "byte_level"
    sentencepiece = "sentencepiece"


class TokenizerSource(Choice):
    pretrained = "pretrained"
    train = "train"
    extend = "extend"


class TokenizerKind(Choice):
    bpe = "bpe"
    unigram = "unigram"


class DataFormat(Choice):
    auto = "auto"
    hub = "hub"
    builtin = "builtin"
    json = "json"
    text = "text"
    parquet = "parquet"
    csv = "csv"


class TextSampleBy(Choice):
    line = "line"
    paragraph = "paragraph"
    document = "document"


class InitMethod(Choice):
    focus = "focus"
    mean = "mean"
    random = "random"
    subword_mean = "subword_mean"
    checkpoint = "checkpoint"


class FocusFallback(Choice):
    subword_mean = "subword_mean"
    random = "random"


class RecoverRows(Choice):
    input = "input"
    input_output = "input_output"


class Split(Choice):
    validation = "validation"
    test = "test"
    train = "train"


class HeldOutSplit(Choice):
    """A split never trained on (`probe.split`)."""

    validation = "validation"
    test = "test"


class Dtype(Choice):
    """Weights dtype when loading (`auto`: the checkpoint's)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"


class TrackingBackend(Choice):
    mlflow = "mlflow"
    none = "none"


# ------------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------------
@dataclass
class TinyModelConfig:
    """A random model of `family` built from its real config class (tests, smoke runs).

    Its teacher tokenizer is trained in-process on `matt.tiny.SAMPLE_TEXTS` (deterministic)."""

    hidden_size: int = 64
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    tokenizer_style: TokenizerStyle = TokenizerStyle.byte_level
    tokenizer_vocab_size: int = 400
    seed: int = 0


@dataclass
class ModelConfig:
    """The teacher: weights (local dir or hub id), its tokenizer, whether its runs add NTP by default."""

    name: str = MISSING
    family: str = MISSING
    """A key of `matt.modeling.registry.FAMILIES` (`register_adapter` adds families at runtime);
    preflight checks it against the registry and the checkpoint's `model_type`."""
    pretrained: Optional[str] = None
    """Local HF model directory or hub id (`${matt_asset:smollm2_135m}` resolves offline assets)."""
    tokenizer: Optional[str] = None
    """Teacher tokenizer dir or hub id; None = `pretrained`."""
    revision: Optional[str] = None
    dtype: Dtype = Dtype.float32
    with_ntp: bool = False
    """Whether AIM runs on this model add the NTP term by default (`objective.with_ntp`'s default:
    untied LM heads learn their new rows only through it, e.g. Qwen3-8B)."""
    trust_remote_code: bool = False
    tiny: Optional[TinyModelConfig] = None
    """Set for random tiny models (then `pretrained` is ignored)."""


@dataclass
class TokenizerConfig:
    """Where the student tokenizer comes from."""

    source: TokenizerSource = MISSING
    path: Optional[str] = None
    """`pretrained`: tokenizer dir or hub id."""
    kind: TokenizerKind = TokenizerKind.bpe
    """`train`: BPE or Unigram."""
    vocab_size: int = 16000
    """`train`: size of the new vocabulary (an upper bound on small corpora)."""
    num_new_tokens: int = 8192
    """`extend`: target-language tokens appended to the teacher vocabulary."""
    min_frequency: int = 2
    """`extend`: a new token must occur this often in the teacher's segmentation of the train split."""
    max_documents: Optional[int] = None
    """Cap on training documents used to learn the tokenizer (None = the whole train split)."""


@dataclass
class DataConfig(DataSettings):
    """Target-language text: a hub dataset, local files, or the built-in sample; how it becomes
    examples (`max_length`, `text_column`, `num_proc`, `cache_dir`) is `matt.config.DataSettings`."""

    name: str = MISSING
    path: str = MISSING
    """Hub dataset id, a local file (.txt/.jsonl/.json/.parquet/.csv), a local directory holding
    `{split}.{jsonl,json,parquet,txt,csv}` files, or `builtin:sample`."""
    config_name: Optional[str] = None
    """Hub dataset configuration (e.g. a language subset)."""
    format: DataFormat = DataFormat.auto
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    """Held-out split; when the source lacks it, `validation_fraction` of train is held out."""
    test_split: Optional[str] = "test"
    validation_fraction: float = 0.1
    text_sample_by: TextSampleBy = TextSampleBy.paragraph
    """How .txt files are cut into documents."""
    streaming: bool = False
    """Stream a hub dataset and keep the first `max_documents` (needs max_documents)."""
    max_documents: Optional[int] = None
    """Cap on training documents (first N)."""
    max_tokens: Optional[int] = None
    """Cap on training text, in teacher tokens (first documents until reached)."""
    max_validation_documents: Optional[int] = None
    seed: int = 0
    """Seed of the train/validation split by fraction."""


@dataclass
class InitConfig:
    """How the new tokens' embeddings start (shared tokens always copy the teacher's rows)."""

    method: InitMethod = MISSING
    fasttext_min_count: int = 1
    fasttext_epochs: int = 3
    fasttext_dim: int = 100
    fasttext_threads: int = 1
    focus_fallback: FocusFallback = FocusFallback.subword_mean
    """`focus`: how new tokens without a fastText vector start: the mean teacher row of their teacher
    decomposition (`subword_mean`) or a draw from N(mean, std) of the teacher rows (`random`)."""
    checkpoint: Optional[str] = None
    """`checkpoint`: an `embeddings.safetensors` or a directory holding one (a previous run)."""
    seed: int = 0


@dataclass
class ObjectiveConfig(ObjectiveSettings):
    """What trains the student's embeddings: `matt.config.ObjectiveSettings` plus the pipeline's own
    steps (the AIM depth the adapters are built at, which rows are frozen)."""

    name: str = MISSING
    with_ntp: bool = "${model.with_ntp}"  # the one default that depends on the model
    """Add a next-token-prediction term; default: the model's recommendation (`model.with_ntp`)."""
    n_layers: Optional[int] = None
    """AIM depth (AIM layer = n_layers - 1), the one place it is set; None = about a third of the
    model's layers, `max(1, round(num_hidden_layers / 3))` (resolved once, by preflight)."""
    freeze_shared: bool = True
    """Keep the embeddings of tokens shared with the teacher fixed."""


TrainConfig = TrainSettings
"""The `train` group's schema is `matt.config.TrainSettings` itself."""


@dataclass
class RecoverConfig:
    """`experiment=recover_known` (see `matt.pipeline.recover`): the student tokenizer is the teacher's,
    K frequent tokens have their rows deleted (set by `init.method`: mean | random), training brings
    them back, and recovery is measured against the known rows."""

    enabled: bool = False
    """Run the known-answer experiment instead of a transfer (the `tokenizer` group is then unused)."""
    rank_start: int = 20
    rank_end: int = 1020
    """Deleted: the teacher tokens at frequency ranks [rank_start, rank_end) of the train split."""
    rows: RecoverRows = RecoverRows.input_output
    """input: only input rows are deleted (the LM head keeps the true rows) | input_output: both (a tied
    model's output side then follows `objective.output_embeddings`)."""
    eval_every: int = 50
    """Bits per byte every this many steps (a multiple of train.log_every_n_steps), at 0 and at the end."""
    eval_max_chars: Optional[int] = 4000
    """Each evaluated document is cut to its first N characters (eval.max_documents caps their number)."""


@dataclass
class ProbeConfig:
    """Held-out diagnostics during training (`matt.pipeline.probe`): budget curves and why they flatten."""

    enabled: bool = False
    every_s: Optional[float] = None
    """Measure every this many seconds of training time (the probe's own time is not counted)."""
    every_n_steps: Optional[int] = None
    """... or every this many steps (a multiple of train.log_every_n_steps); both None: start and end only."""
    split: HeldOutSplit = HeldOutSplit.validation
    """The held-out split measured."""
    max_documents: Optional[int] = 9
    max_document_chars: Optional[int] = 2000
    """Each document is cut to its first N characters (bits per byte and the AIM batches)."""
    aim_batches: int = 4
    """Held-out batches (of train.batch_size segmented windows) for the held-out AIM loss; 0 = none."""
    bpb: bool = True
    """Bits per byte of the full-depth model at each measurement (the expensive part)."""


@dataclass
class TrackingConfig:
    """Where runs are recorded."""

    backend: TrackingBackend = TrackingBackend.mlflow
    uri: Optional[str] = None
    """None = an embedded sqlite file `${paths.output_root}/mlflow.db`; else any MLflow URI."""
    require_uri: bool = False
    """Fail (before any work) when `uri` is not set: `tracking=mlflow_server` must not silently
    fall back to the embedded store."""
    experiment_name: str = "${name}"
    run_name: Optional[str] = None
    """None = the job's overrides (sweeps) or the preset name."""
    log_embeddings: bool = True
    log_tokenizer: bool = True
    log_model: bool = False
    """Also upload the adapted HF model directory (large)."""
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ChoiceEvalConfig:
    enabled: bool = True
    num_items: int = 40
    num_choices: int = 4
    context_sentences: int = 3
    seed: int = 0
    pmi: bool = True
    """Also `choice_accuracy_pmi`: choices ranked by how much the context raises their likelihood."""
    whole_split: bool = True
    """Draw the items from every document of `eval.split`, not only the text capped for bits per
    byte (`eval.max_documents` / `max_bytes` / `max_document_bytes`): items are short, so hundreds
    stay cheap, and a capped text may not hold enough answerable sentences."""
    batch_size: int = 16
    """Contexts per forward pass; their choices then run 8 rows at a time on the shared key/value cache."""


@dataclass
class GenerationEvalConfig:
    enabled: bool = True
    num_items: int = 16
    prompt_chars: int = 200
    target_chars: int = 100
    max_new_tokens: int = 48
    seed: int = 0
    batch_size: int = 16
    """Prompts decoded together (left-padded, sorted by length): each decoding step reads every
    weight of the model for one token per prompt, so batching the prompts is what keeps its
    throughput up (the default decodes the default 16 items in one batch)."""


@dataclass
class LmEvalConfig:
    enabled: bool = False
    tasks: list[str] = field(default_factory=list)
    include_path: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    batch_size: int = 4


@dataclass
class EvalConfig:
    """Which evaluations run, on which models, with what caps (CPU evaluation is slow)."""

    enabled: bool = True
    original: bool = True
    """The teacher with its own tokenizer."""
    init: bool = True
    """The student before training (e.g. FOCUS)."""
    final: bool = True
    """The trained student."""
    split: Split = Split.validation
    """Which split of the `data` group is evaluated."""
    max_documents: Optional[int] = 64
    max_bytes: Optional[int] = 200000
    """Cap on evaluated UTF-8 bytes (documents in order; the last one is cut to fit)."""
    max_document_bytes: Optional[int] = None
    """Cut each document to its first ~N UTF-8 bytes (at a line break) before the caps above, so a
    small budget still covers every document instead of the first few long ones."""
    max_length: int = 512
    """Window length (tokens) for bits-per-byte."""
    batch_size: int = 4
    device: Optional[str] = None
    """None = cuda if available, else cpu."""
    precision: Precision = Precision("32")
    """`32` (float32, the default: every reported number so far), `bf16` (bf16 autocast around the
    model's forward; ~1.5x faster on an AMX CPU, Gemma 3 270M: bits per byte within 1e-4, the same
    multiple-choice answers on 199 of 200 items, docs/EXPERIMENTS.md) or `auto` (bf16 where native)."""
    bpb: bool = True
    compression: bool = True
    unigram: bool = True
    """Context-free unigram floor of each tokenizer (fit on the train split)."""
    unigram_max_train_documents: Optional[int] = None
    choice: ChoiceEvalConfig = field(default_factory=ChoiceEvalConfig)
    generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    progress: bool = True


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    """Hydra run/sweep directories and the default MLflow sqlite file live here."""
    cache_dir: str = "${oc.env:MATT_CACHE,${oc.env:HOME,.}/.cache/matt}"
    """Trained tokenizers, fastText models and prepared datasets (shared by runs)."""


# ------------------------------------------------------------------------------------------------
# primary configs
# ------------------------------------------------------------------------------------------------
@dataclass
class TransferConfig:
    """`experiments/transfer.py`: tokenizer -> data -> init -> train -> save -> evaluate."""

    name: str = "matt"
    """Preset name; the default MLflow experiment name."""
    label: Optional[str] = None
    """Method label in reports; None = derived from objective, loss and depth."""
    model: ModelConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    data: DataConfig = MISSING
    init: InitConfig = MISSING
    objective: ObjectiveConfig = MISSING
    train: TrainConfig = MISSING
    tracking: TrackingConfig = MISSING
    eval: EvalConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    save_model: bool = True
    """Write the adapted model + tokenizer as a HF directory (`<output_dir>/model`)."""
    dry_run: bool = False
    """Only compose and validate the config (preflight), then stop."""


@dataclass
class EvaluateConfig:
    """`experiments/evaluate.py`: evaluate a saved model directory with the `eval` group."""

    name: str = "evaluate"
    model_dir: Optional[str] = None
    """A HF model directory (or hub id) loadable by AutoModelForCausalLM; or use `run_dir`."""
    run_dir: Optional[str] = None
    """A transfer job's directory (needs no `save_model`): its original model, initial and learned
    embeddings (as `eval.original` / `eval.init` / `eval.final` select) are evaluated again with this
    `eval` group, e.g. on more text or another split; `data` should be the job's data group."""
    tokenizer: Optional[str] = None
    """None = `model_dir`."""
    prefix: str = "model"
    """Metric prefix (`<prefix>/bpb`, ...)."""
    dtype: Dtype = Dtype.float32
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING
    eval: EvalConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ReportConfig:
    """`experiments/report.py`: MLflow runs of an experiment -> tables and plots."""

    name: str = "report"
    experiment_name: str = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    output_dir: Optional[str] = None
    """None = `${paths.output_root}/reports/<experiment_name>`."""
    include_failed: bool = False
    metrics: list[str] = field(default_factory=lambda: ["bpb", "bpb_new", "bpb_shared", "choice_accuracy",
                                                         "choice_accuracy_pmi", "chrf", "bytes_per_token"])


def register_configs() -> None:
    """Register the root schemas (the YAML primary configs extend them through their defaults)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="transfer_schema", node=TransferConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="report_schema", node=ReportConfig)


def dataset_cache_dir(cfg) -> str:
    return str(cfg.data.cache_dir or Path(cfg.paths.cache_dir) / "datasets")


def matt_config(cfg, *, checkpoint_dir=None) -> MATTConfig:
    """The `MATTConfig` of a composed transfer config: the train/objective/data groups' fields as they
    are (their schemas are `MATTConfig`'s settings classes), so its errors name the Hydra key."""
    values = {name: cfg[group][name] for group, settings in GROUPS.items() for name in settings.__dataclass_fields__}
    return MATTConfig(**values | dict(
        cache_dir=dataset_cache_dir(cfg), checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
        resume=bool(cfg.train.resume and checkpoint_dir is not None), extra={"name": cfg.name}))
