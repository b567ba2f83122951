from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from roadwork.config import RunConfig, load_config, parse_overrides, preset_names
from roadwork.errors import ConfigError


def test_default_yaml_mirrors_the_model_defaults():
    path = Path(__file__).resolve().parents[1] / "src" / "roadwork" / "configs" / "default.yaml"
    assert yaml.safe_load(path.read_text()) == RunConfig().model_dump(mode="json")


def test_presets_load_and_demo_is_named_demo():
    assert {"default", "demo"} <= set(preset_names())
    assert load_config("demo").name == "demo"


def test_overrides_are_typed_without_eval():
    got = parse_overrides(["train.epochs=3", "train.augment=false", "train.lr=1e-3", "name=x", "a.b=[1, 2]"])
    assert got == {"train": {"epochs": 3, "augment": False, "lr": 1e-3}, "name": "x", "a": {"b": [1, 2]}}
    assert parse_overrides(["name=__import__('os')"]) == {"name": "__import__('os')"}  # a string, not code


def test_nested_override_wins_over_preset():
    cfg = load_config("demo", ["train.epochs=2", "conformal.alpha=0.2"])
    assert (cfg.train.epochs, cfg.conformal.alpha) == (2, 0.2)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.epoch=3", "train.epochs"),
        ("conformal.alhpa=0.1", "conformal.alpha"),
        ("epochs=3", "train.epochs"),
    ],
)
def test_unknown_key_suggests_the_right_one(override, suggestion):
    with pytest.raises(ConfigError, match=f"Unknown config key .*Did you mean '{suggestion}'"):
        load_config("demo", [override])


def test_invalid_value_names_key_value_and_allowed():
    with pytest.raises(ConfigError, match=r"'conformal.alpha': got 1.5; .*less than 1"):
        load_config(None, ["conformal.alpha=1.5"])
    with pytest.raises(
        ConfigError,
        match=r"'calibrate.method': got 'platt'; one of 'none', 'temperature', 'classwise_temperature'",
    ):
        load_config(None, ["calibrate.method=platt"])


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(None, ["data.splits.train=0.9"])


def test_missing_config_file_lists_presets():
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset.*demo"):
        load_config("no-such.yaml")


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


def test_yaml_file_with_typo(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match="Did you mean 'train.epochs'"):
        load_config(p)


# ------------------------------------------------------------------------------------- cross-field rules
# Each contradiction below depends only on the config; it used to pass load_config and fail mid-pipeline
# (after training, for the cascade's). Each error names the fields, their values and the fix.


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (
            ["cascade.enabled=true", "cascade.small.deferral=learned", "cascade.small.gatekeeper_epochs=2"],
            ["cascade.small.deferral=learned", "gatekeeper_epochs=2", "gatekeeper_epochs=0"],
        ),
        (
            ["cascade.enabled=true", "cascade.boosting=none", "cascade.small=null"],
            ["cascade.boosting=none", "cascade.small=null", "cascade.enabled=false"],
        ),
        (
            ["train.mixup=0.2", "train.loss=gatekeeper"],
            ["train.mixup=0.2", "train.loss='gatekeeper'", "train.loss=ce"],
        ),
        (
            ["cascade.enabled=true", "cascade.small.gatekeeper_epochs=1", "train.cutmix=1.0"],
            ["cascade.small.gatekeeper_epochs>0", "train.cutmix=1", "train.cutmix=0"],
        ),
        (
            [
                "cascade.enabled=true",
                "cascade.small.deferral=learned",
                "cascade.small.gatekeeper_epochs=0",
                "train.mixup=0.4",
            ],
            ["cascade.small.deferral=learned", "train.mixup=0.4", "deferral=confidence"],
        ),
        (
            ["train.recipe=explora"],
            ["train.recipe=explora", "train.unlabeled=FOLDER", "train.recipe=supervised"],
        ),
        (
            ["train.strategy=fsdp", "train.devices=2", "train.compile=true"],
            ["train.strategy=fsdp", "train.compile=True", "train.strategy=ddp"],
        ),
        (
            ["tracking.enabled=false", "tracking.register_as=demo-model"],
            ["tracking.register_as=demo-model", "tracking.enabled=false", "tracking.enabled=true"],
        ),
        (
            ["tracking.enabled=false", "tracking.wandb=true"],
            ["tracking.wandb=True", "tracking.enabled=false"],
        ),
    ],
)
def test_config_only_contradictions_fail_at_load_naming_fields_values_and_fix(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    msg = str(err.value)
    assert all(n in msg for n in names), msg
    assert "Value error" not in msg and "{" not in msg  # the rule's own sentence, not a dump of the section


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "cascade.enabled=false",
            "cascade.small.deferral=learned",
            "train.mixup=0.2",
        ],  # no cascade: no small net
        ["cascade.enabled=true", "cascade.small.deferral=learned", "cascade.small.gatekeeper_epochs=0"],
        ["cascade.enabled=true", "cascade.small=null", "cascade.boosting=sklearn"],
        ["train.mixup=0.2", "train.loss=ce", "cascade.enabled=false"],
        [
            "train.mixup=0.2",
            "cascade.small.gatekeeper_epochs=0",
        ],  # the small net by confidence: hard labels unneeded
        ["train.strategy=fsdp", "train.devices=1", "train.compile=true"],  # one device: no sharding happens
        ["train.recipe=explora", "train.unlabeled=photos/"],
        ["tracking.enabled=true", "tracking.register_as=demo-model", "tracking.wandb=true"],
    ],
)
def test_the_rules_allow_the_consistent_neighbours(overrides):
    load_config("demo", overrides)


def test_cascade_enabled_is_true_false_or_auto_with_one_message():
    from roadwork.config import ConfigError, load_config

    assert load_config("demo").cascade.enabled == "auto"
    assert load_config("demo", ["cascade.enabled=true"]).cascade.enabled is True
    assert load_config("demo", ["cascade.enabled=False"]).cascade.enabled is False
    import pytest

    with pytest.raises(ConfigError, match=r"cascade.enabled.*must be true, false or auto \(got 'maybe'\)"):
        load_config("demo", ["cascade.enabled=maybe"])


def test_a_numeric_positive_class_names_the_class_of_that_name():
    from roadwork.config import load_config

    assert load_config("default", ["policy.positive_class=1"]).policy.positive_class == "1"
    assert load_config("default", ["policy.positive_class=roadwork"]).policy.positive_class == "roadwork"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """A 1 KB "billion laughs" config grew roadwork config show to 1.5 GB in 25 s: aliases are refused."""
    import time

    import pytest

    from roadwork.config import ConfigError, load_config

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        lines.append(
            f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]"
        )
    lines.append("model: {kwargs: {bomb: *i}}")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"aliases \(\*a\) are not accepted"):
        load_config(str(bomb))
    with pytest.raises(
        ConfigError
    ):  # an alias in an override is not YAML we read: the kwargs are not a mapping
        load_config("demo", ["model.kwargs={a: &x [1, 2], b: [*x, *x]}"])
    assert (
        time.perf_counter() - t0 < 30
    )  # generous: the point is that nothing expands (it took 25 s and 1.5 GB)


def test_the_synthetic_image_count_is_bounded():
    """n=10**12 built a list of 1.6e10 jobs (9 GB in a minute) before writing anything: refused now."""
    from pydantic import ValidationError

    from roadwork.config import SyntheticConfig

    with pytest.raises(ValidationError, match="less than or equal to 10000000"):
        SyntheticConfig(n=10**12)
