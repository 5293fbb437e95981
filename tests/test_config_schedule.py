"""MATTConfig validation and the warmup–stable–decay schedule."""

import pytest
import torch

import dataclasses

from matt.choices import Loss, Precision
from matt.config import GROUPS, MATTConfig, hydra_key, native_bf16
from matt.schedule import wsd_factor, wsd_scheduler


def test_defaults_are_valid_and_roundtrip():
    cfg = MATTConfig()
    assert cfg.precision == "auto"
    assert cfg.mixed_precision == ("bf16" if native_bf16() else "no")
    assert MATTConfig(precision="auto", cpu=True).mixed_precision == ("bf16" if native_bf16(cpu=True) else "no")
    assert MATTConfig(precision="32").mixed_precision == "no"
    assert MATTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.save_every_n_steps == 100  # the one default (configs/train/default.yaml does not restate it)


def test_choices_are_members_and_plain_strings():
    cfg = MATTConfig(loss="cosine", precision="bf16")
    assert cfg.loss is Loss.cosine and cfg.loss == "cosine" and f"{cfg.loss}" == "cosine"
    assert cfg.precision is Precision["bf16-mixed"] and cfg.mixed_precision == "bf16"  # an alias
    assert MATTConfig(precision=32).precision == "32"  # what a command line's `32` arrives as
    assert cfg.to_dict()["loss"] == "cosine" and type(cfg.to_dict()["loss"]) is str


def test_every_field_belongs_to_one_group():
    names = [name for settings in GROUPS.values() for name in settings.__dataclass_fields__]
    assert len(names) == len(set(names))  # a name in two groups would silently merge in MATTConfig
    own = {f.name for f in dataclasses.fields(MATTConfig)} - set(names)
    assert own == {"checkpoint_dir", "extra"}
    assert (hydra_key("lr"), hydra_key("loss"), hydra_key("max_length"), hydra_key("extra")) == (
        "train.lr", "objective.loss", "data.max_length", "extra")


@pytest.mark.parametrize(
    "kwargs, field",  # the error names the field by its Hydra key
    [
        ({"loss": "l1"}, "loss"),
        ({"aim_impl": "aim_plus"}, "aim_impl"),
        ({"output_embeddings": "shared"}, "output_embeddings"),
        ({"precision": "int8"}, "precision"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"num_warmup_steps": 8, "num_decay_steps": 8, "max_steps": 10}, "num_warmup_steps"),
        ({"aim_impl": "none"}, "aim_impl"),
        ({"output_embeddings": "ntp"}, "output_embeddings"),
        ({"resume": True}, "resume"),
        ({"ntp_scope": "inputs"}, "ntp_scope"),
        ({"ntp_scope": "head"}, "ntp_scope"),  # needs with_ntp
        ({"ntp_scope": "head", "with_ntp": True, "aim_impl": "none"}, "ntp_scope"),  # nothing would train inputs
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{hydra_key(field)}=.* is invalid: "):
        MATTConfig(**kwargs)


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="max_stpes"):
        MATTConfig.from_dict({"max_stpes": 3})


def test_lightning_alias_for_accumulation():
    cfg = MATTConfig.from_dict({"accumulate_grad_batches": 4})
    assert cfg.gradient_accumulation_steps == 4 == cfg.accumulate_grad_batches


def test_ntp_baseline_and_precision_mapping():
    cfg = MATTConfig(aim_impl="none", with_ntp=True, precision="bf16-mixed")
    assert cfg.mixed_precision == "bf16"


def reference_wsd(step, total, warmup, decay):
    """The schedule's definition, step by step."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total - decay:
        return (total - step) / decay
    return 1.0


@pytest.mark.parametrize("warmup, decay", [(0, 0), (3, 0), (0, 4), (3, 4), (10, 0)])
def test_wsd_matches_definition_and_drives_optimizer(warmup, decay):
    total = 10
    for step in range(total):
        assert wsd_factor(step, total, warmup, decay) == pytest.approx(reference_wsd(step, total, warmup, decay))
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = wsd_scheduler(opt, total, warmup, decay)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * reference_wsd(s, total, warmup, decay) for s in range(total)])
    if decay:
        assert seen[-1] == pytest.approx(2.0 / decay)
    if warmup:
        assert seen[0] == pytest.approx(2.0 / warmup) and max(seen) == pytest.approx(2.0)


@pytest.mark.parametrize("warmup, decay", [(0, 4), (3, 0), (3, 4), (9, 0)])
def test_wsd_differs_from_transformers_only_by_the_first_warmup_update(warmup, decay):
    """transformers' `get_wsd_schedule` (linear phases) has the same stable and decay factors, but its
    warm-up starts at factor 0 (the first update does not move): ours is its warm-up one step ahead."""
    from transformers import get_wsd_schedule

    total = 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_wsd_schedule(opt, warmup, decay, num_training_steps=total, decay_type="linear").lr_lambdas[0]
    for step in range(total):
        expected = theirs(step + 1) if step < warmup else theirs(step)
        assert wsd_factor(step, total, warmup, decay) == pytest.approx(expected)
    if warmup:
        assert theirs(0) == 0.0 < wsd_factor(0, total, warmup, decay)


def test_native_bf16_detection(monkeypatch):


    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not native_bf16() and MATTConfig().mixed_precision == "no"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16() and MATTConfig().mixed_precision == "bf16"
    assert MATTConfig(precision="32").mixed_precision == "no"  # an explicit choice always wins
