"""Config composition: every option of every group composes against the structured-config schema,
bad configs fail at composition naming the key, the launcher configs validate against their
plugins' schemas, and the `${matt_asset:...}` resolver defers to `matt.assets` lazily."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from matt.hydra_app import compose, config_dir
from matt.modeling.registry import FAMILIES
from matt.pipeline import config as schema

CONFIGS = config_dir()
GROUPS = ("model", "tokenizer", "data", "init", "objective", "train", "tracking", "eval", "experiment")
GROUP_SCHEMAS = {
    "model": schema.ModelConfig, "tokenizer": schema.TokenizerConfig, "data": schema.DataConfig,
    "init": schema.InitConfig, "objective": schema.ObjectiveConfig, "train": schema.TrainConfig,
    "tracking": schema.TrackingConfig, "eval": schema.EvalConfig,
}
# Real models whose public config unties the LM head (tiny models: read from their config below).
UNTIED = {"llama3_8b", "mistral_7b", "qwen3_8b", "pythia_1b"}


def chain_text(exc: BaseException) -> str:
    """The messages of an exception and its causes (Hydra wraps OmegaConf's detailed error)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture
def fake_assets(monkeypatch, tmp_path):
    """A stand-in `matt.assets` recording which assets were resolved."""
    calls = []
    module = types.ModuleType("matt.assets")

    def resolve(name, *, prepare=True):
        calls.append(name)
        return tmp_path / "assets" / name

    module.resolve = resolve
    monkeypatch.setitem(sys.modules, "matt.assets", module)
    return calls


def test_every_group_has_the_options_the_issue_lists():
    assert {"smollm2_135m", "gemma3_270m", "gemma3_4b", "gemma3_12b", "llama3_8b", "mistral_7b", "qwen3_0_6b",
            "qwen3_8b", "pythia_1b"} <= set(options("model"))
    assert {f"tiny_{family}" for family in ("llama", "gemma3", "mistral", "qwen3", "gpt_neox")} <= set(options("model"))
    assert {"pretrained", "train", "extend"} <= set(options("tokenizer"))
    assert {"focus", "mean", "random", "checkpoint"} <= set(options("init"))
    assert {"aim", "aim_star", "ntp", "aim_ntp"} <= set(options("objective"))
    assert {"mlflow", "mlflow_server", "none"} <= set(options("tracking"))
    presets = {"smoke", "demo", "demo_en", "demo_gemma3", "layer_ablation", "loss_ablation", "paper_uk_gemma3"}
    assert presets <= set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_against_the_schema(group, option, fake_assets):
    cfg = compose("transfer", [f"{group}={option}"])
    for name, dataclass_type in GROUP_SCHEMAS.items():
        assert OmegaConf.get_type(cfg[name]) is dataclass_type, name
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # every interpolation resolves
    if group == "model":
        model = resolved["model"]
        assert model["family"] in FAMILIES
        assert model["pretrained"] or model["tiny"] is not None
        if model["tiny"] is not None:  # NTP on by default exactly where the LM head is untied
            from matt.tiny import tiny_config

            assert model["with_ntp"] == (not tiny_config(model["family"], 400).tie_word_embeddings), option
        else:
            assert model["with_ntp"] == (option in UNTIED), option
        # the AIM depth is set in one place, objective.n_layers (None: a third of the model's layers,
        # resolved by preflight); the objective's NTP default is the model's
        assert "n_layers" not in model and resolved["objective"]["n_layers"] is None
        assert resolved["objective"]["with_ntp"] == model["with_ntp"]


def test_offline_assets_resolve_lazily_through_matt_assets(fake_assets, tmp_path):
    cfg = compose("transfer", ["model=smollm2_135m", "data=manpages_uk"])
    assert fake_assets == []  # composing alone does not touch the assets
    assert cfg.model.pretrained == str(tmp_path / "assets" / "smollm2_135m")
    assert cfg.data.path == str(tmp_path / "assets" / "manpages_uk")
    assert fake_assets == ["smollm2_135m", "manpages_uk"]
    # a hub id or a plain path works the same way
    cfg = compose("transfer", ["model=smollm2_135m", "model.pretrained=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert cfg.model.pretrained == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_asset_machinery_gives_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matt.assets", None)  # import fails
    cfg = compose("transfer", ["model=gemma3_270m"])
    with pytest.raises(Exception, match="hub id"):
        _ = cfg.model.pretrained


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_override_the_defaults(preset, fake_assets):
    """Every key a preset sets survives composition (no later default or group file undoes it)."""
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml"))
    cfg = OmegaConf.to_container(compose("transfer", [f"experiment={preset}"]), enum_to_str=True)
    overridden = {key: value for key, value in _leaves(own)
                  if not key.startswith(("defaults", "hydra."))}
    assert overridden, preset
    for key, value in overridden.items():
        composed = cfg
        for part in key.split("."):
            composed = composed[part]
        assert composed == value, (preset, key)
    for choice in own.get("defaults", []):  # `override /model: smollm2_135m` picks that model file
        if isinstance(choice, dict) and "override /model" in choice:
            assert cfg["model"]["name"] == choice["override /model"], preset


def test_preset_properties(fake_assets):
    smoke = compose("transfer", ["experiment=smoke"])
    assert smoke.model.tiny is not None and smoke.data.path == "builtin:sample"  # offline
    assert smoke.train.max_steps <= 20  # seconds
    demo = compose("transfer", ["experiment=demo"])
    assert demo.eval.max_length >= 4096 and demo.eval.max_document_bytes  # whole documents as context
    assert demo.eval.original and demo.eval.init and demo.eval.final


@pytest.mark.parametrize("preset,params", [
    ("layer_ablation", {"objective.n_layers"}),
    ("loss_ablation", {"objective", "objective.loss"}),
])
def test_ablation_presets_carry_their_sweeps(preset, params, fake_assets):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose("transfer", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert set(cfg.hydra.sweeper.params) == params
    assert cfg.name == preset and cfg.model.name == "smollm2_135m"  # built on the demo setting


@pytest.mark.parametrize("override,message", [
    ("model=no_such_model", "Available options in 'model'"),
    ("objective.typo=1", "objective.typo"),
    ("objective.loss=l1", r"expected one of \[mse, cosine\]"),
    ("objective=aim_star2", "aim_star"),
    ("init.method=wechsel", r"expected one of \[focus, mean, random, subword_mean, checkpoint\]"),
    ("train.lr=fast", "train.lr"),
    ("tracking.backend=wandb", r"expected one of \[mlflow, none\]"),
    ("eval.split=dev", r"Invalid value 'dev', expected one of \[validation, test, train\]\n\s+full_key: eval\.split"),
    ("probe.split=train", r"Invalid value 'train', expected one of \[validation, test\]\n\s+full_key: probe\.split"),
    ("model.dtype=float8",
     r"Invalid value 'float8', expected one of \[float32, bfloat16, float16, auto\]\n\s+full_key: model\.dtype"),
])
def test_bad_overrides_fail_at_composition_naming_the_key(override, message):
    with pytest.raises(Exception) as excinfo:
        compose("transfer", ["experiment=smoke", override])
    assert re.search(message, chain_text(excinfo.value)), chain_text(excinfo.value)


def test_slurm_launcher_config_validates_against_the_submitit_schema():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose("transfer", overrides=["experiment=smoke", "hydra/launcher=slurm",
                                                   "hydra.launcher.partition=gpu"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
        assert launcher.timeout_min > 0 and launcher.mem_gb > 0
        for bad, key in (("hydra.launcher.gpus_per_nodee=1", "gpus_per_nodee"),
                         ("hydra.launcher.mem_gb=lots", "mem_gb")):
            with pytest.raises(Exception) as excinfo:
                hydra_compose("transfer", overrides=["experiment=smoke", "hydra/launcher=slurm", bad],
                              return_hydra_config=True)
            assert key in chain_text(excinfo.value)
        # every key our YAML sets is a field of the plugin's schema (typos in the file would not merge)
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

        ours = OmegaConf.load(CONFIGS / "hydra" / "launcher" / "slurm.yaml")
        assert set(ours) - {"defaults"} <= set(SlurmQueueConf.__dataclass_fields__)
        parallel = hydra_compose("transfer", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
        assert parallel.hydra.launcher._target_.endswith("JoblibLauncher") and parallel.hydra.launcher.n_jobs == 2


def test_matt_config_errors_name_the_hydra_key():
    from matt.pipeline.config import matt_config

    cfg = compose("transfer", ["experiment=smoke", "train.lr=-1"])
    with pytest.raises(ValueError, match=r"^train\.lr=-1\.0 is invalid: must be > 0"):
        matt_config(cfg)
    cfg = compose("transfer", ["experiment=smoke", "objective.output_embeddings=ntp"])
    with pytest.raises(ValueError, match=r"^objective\.output_embeddings='ntp' is invalid: .*objective\.with_ntp"):
        matt_config(cfg)
    # a precision outside `matt.choices.Precision` fails while composing, naming the key and the choices
    with pytest.raises(Exception) as excinfo:
        compose("transfer", ["experiment=smoke", "train.precision=fp8"])
    assert "train.precision" in chain_text(excinfo.value) and "bf16-mixed" in chain_text(excinfo.value)


def test_group_values_map_onto_matt_config():
    from matt.config import GROUPS
    from matt.pipeline.config import matt_config

    cfg = compose("transfer", ["experiment=smoke", "objective=aim_star", "objective.loss=cosine",
                               "objective.n_layers=3", "train.max_steps=7", "model=tiny_qwen3",
                               "train.adam_eps=1e-6", "data.num_proc=2", "train.precision=bf16"])
    config = matt_config(cfg, checkpoint_dir="/tmp/ckpt")
    assert (config.aim_impl, config.loss, config.max_steps, config.checkpoint_dir) == (
        "aim_star", "cosine", 7, "/tmp/ckpt")
    assert (config.adam_eps, config.num_proc, config.precision, config.mixed_precision) == (1e-6, 2, "bf16-mixed", "bf16")
    for group, settings in GROUPS.items():  # every field of every group arrives as composed
        for name in settings.__dataclass_fields__:
            if name not in ("cache_dir", "resume"):  # the two the pipeline decides (output dirs)
                assert getattr(config, name) == (tuple(cfg[group][name]) if name == "adam_betas"
                                                 else cfg[group][name]), name
    assert cfg.objective.n_layers == 3
    assert cfg.objective.with_ntp is True and config.with_ntp  # untied Qwen3 turns NTP on by default ...
    cfg = compose("transfer", ["experiment=smoke", "model=tiny_qwen3", "objective.with_ntp=false"])
    assert cfg.objective.with_ntp is False  # ... unless the objective says otherwise
    ntp = compose("transfer", ["experiment=smoke", "objective=ntp"])
    assert matt_config(ntp).aim_impl == "none" and matt_config(ntp).with_ntp


def test_config_dir_can_be_relocated(monkeypatch, tmp_path):
    monkeypatch.setenv("MATT_CONFIG_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MATT_CONFIG_DIR"):
        config_dir()
    monkeypatch.setenv("MATT_CONFIG_DIR", str(CONFIGS))
    assert config_dir() == Path(CONFIGS)


def test_method_labels_name_what_trains(fake_assets):
    from matt.pipeline.run_context import method_label

    def label(*overrides, with_ntp=False, tied=True):
        return method_label(compose("transfer", ["experiment=demo", *overrides]), 10, with_ntp, tied)

    assert label(with_ntp=True) == "aim mse L10 +ntp(head)"
    assert label("objective.output_embeddings=keep_init", "objective.with_ntp=false") == "aim mse L10 keep_init"
    assert label("objective=aim_star", "objective.output_embeddings=tied", "objective.loss=cosine") == \
        "aim_star cosine L10"
    assert label("objective=ntp", "objective.ntp_scope=all", with_ntp=True) == "ntp"
    assert label("objective.freeze_shared=false", "objective.ntp_scope=all", with_ntp=True) == "aim mse L10 +ntp unfrozen"
    assert label("label=mine") == "mine"


def test_every_choice_of_the_schemas_is_a_str_valued_choice():
    """Pipeline and training choices are one kind (`matt.choices.Choice`): a composed value compares
    equal to its plain string and digests like it, so no call site unwraps enum members."""
    import dataclasses
    import enum
    import typing

    from matt.choices import Choice
    from matt.digests import cache_key

    seen: set[type] = set()

    def walk(cls):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
            if isinstance(hint, type) and issubclass(hint, enum.Enum):
                seen.add(hint)
            elif dataclasses.is_dataclass(hint):
                walk(hint)

    for root in (schema.TransferConfig, schema.EvaluateConfig, schema.ReportConfig):
        walk(root)
    assert {schema.InitMethod, schema.TokenizerSource, schema.DataFormat, schema.Split} <= seen
    for choice in seen:
        assert issubclass(choice, Choice), choice
        for member in choice:
            assert member == member.value and str(member) == member.value
            assert cache_key({"k": member}) == cache_key({"k": member.value})
    cfg = compose("transfer", ["experiment=smoke"])
    assert cfg.tokenizer.source == str(cfg.tokenizer.source) and isinstance(cfg.init.method, schema.InitMethod)
