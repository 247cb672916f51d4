"""Config layers (preset <- YAML <- --set), validation errors and the YAML round trip."""

from __future__ import annotations

import pytest
import yaml

from dqd_ray.config import PRESETS, ConfigError, ExperimentConfig, build_config, parse_set, to_yaml

PRESET_EXPECTATIONS = {
    "cma_mega_td3": ("cma_mega", "td3", True, False),
    "cma_mega_td3_es": ("cma_mega", "td3_es", True, True),
    "cma_mega_es": ("cma_mega", "es", False, True),
    "cma_maega_td3": ("cma_maega", "td3", True, False),
}


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_presets_build(preset):
    name, gradients, uses_td3, uses_es = PRESET_EXPECTATIONS[preset]
    cfg = build_config(preset)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.preset == preset
    assert cfg.algorithm.name == name
    assert cfg.algorithm.gradients == gradients
    assert cfg.uses_td3 is uses_td3
    assert cfg.uses_es is uses_es
    # Only the preset's own fields differ from the defaults.
    assert cfg.td3 == ExperimentConfig().td3


def test_preset_list_is_complete():
    assert set(PRESETS) == set(PRESET_EXPECTATIONS)


def test_cma_mega_es_disables_greedy_insertion():
    assert build_config("cma_mega_es").algorithm.insert_greedy is False
    assert build_config("cma_mega_td3").algorithm.insert_greedy is True


def test_defaults_without_preset():
    cfg = build_config()
    assert cfg.preset is None
    assert cfg.td3.batch_size == 256
    assert cfg.env.id == "QDAntBulletEnv-v0"
    assert cfg.env.resolved_dims() == [6, 6, 6, 6]
    assert cfg.env.resolved_ranges() == [(0.0, 1.0)] * 4


def test_set_overrides_take_effect():
    cfg = build_config(sets=["td3.batch_size=128"])
    assert cfg.td3.batch_size == 128
    assert isinstance(cfg.td3.batch_size, int)
    cfg = build_config(
        "cma_mega_es",
        sets=["es.sigma=0.05", "policy.hidden_sizes=[32, 16]", "algorithm.insert_greedy=true",
              "env.id=QDHopperBulletEnv-v0", "env.archive_dims=[64]"],
    )
    assert cfg.es.sigma == pytest.approx(0.05)
    assert cfg.policy.hidden_sizes == [32, 16]
    # --set overrides the preset.
    assert cfg.algorithm.insert_greedy is True
    assert cfg.env.resolved_dims() == [64]


def test_later_sets_win():
    cfg = build_config(sets=["td3.batch_size=128", "td3.batch_size=64"])
    assert cfg.td3.batch_size == 64


def test_parse_set_nesting_and_yaml_values():
    assert parse_set("td3.batch_size=128") == {"td3": {"batch_size": 128}}
    assert parse_set("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_set("logging.wandb_group=") == {"logging": {"wandb_group": None}}
    # Only the first '=' splits key from value.
    assert parse_set("logging.wandb_group=a=b") == {"logging": {"wandb_group": "a=b"}}


def test_yaml_file_loading(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "cma_mega_td3_es",
        "seed": 7,
        "env": {"id": "QDHalfCheetahBulletEnv-v0", "episode_length": 250},
        "td3": {"batch_size": 100, "gamma": 0.95},
        "es": {"num_samples": 20},
    }))
    cfg = build_config(file=path)
    assert cfg.preset == "cma_mega_td3_es"
    assert cfg.algorithm.gradients == "td3_es"
    assert cfg.seed == 7
    assert cfg.env.id == "QDHalfCheetahBulletEnv-v0"
    assert cfg.env.episode_length == 250
    assert cfg.env.resolved_dims() == [32, 32]
    assert cfg.td3.batch_size == 100 and cfg.td3.gamma == pytest.approx(0.95)
    assert cfg.es.num_samples == 20
    # --set beats the file.
    cfg = build_config(file=path, sets=["td3.batch_size=8"])
    assert cfg.td3.batch_size == 8 and cfg.seed == 7


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(file=tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(file=bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("td3:\n  bach_size: 3\n")
    with pytest.raises(ConfigError, match=r"td3\.bach_size"):
        build_config(file=typo)


@pytest.mark.parametrize("item, field", [
    ("td3.bach_size=128", "td3.bach_size"),
    ("tdd3.batch_size=128", "tdd3"),
    ("algorithm.nmae=cma_mega", "algorithm.nmae"),
])
def test_unknown_keys_name_the_field(item, field):
    with pytest.raises(ConfigError) as err:
        build_config(sets=[item])
    assert field in str(err.value)
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize("item, field", [
    ("td3.batch_size=-1", "td3.batch_size"),
    ("td3.replay_capacity=0", "td3.replay_capacity"),
    ("env.episode_length=-5", "env.episode_length"),
    ("algorithm.batch_size=1", "algorithm.batch_size"),
    ("algorithm.num_emitters=0", "algorithm.num_emitters"),
    ("policy.hidden_sizes=[64, -1]", "policy.hidden_sizes"),
    ("resources.envs_per_worker=0", "resources.envs_per_worker"),
    ("env.archive_dims=[]", "env.archive_dims"),
    ("env.archive_dims=[3, 0, 3, 3]", "env.archive_dims"),
    ("env.id=QDCartpole-v0", "env.id"),
    ("es.num_samples=11", "es.num_samples"),
    ("td3.gamma=1.5", "td3.gamma"),
    ("algorithm.gradients=magic", "algorithm.gradients"),
])
def test_invalid_values_name_the_field(item, field):
    with pytest.raises(ConfigError) as err:
        build_config(sets=[item])
    assert field in str(err.value)


def test_archive_dims_length_must_match_env():
    with pytest.raises(ConfigError) as err:
        build_config(sets=["env.archive_dims=[3, 3]"])  # Ant has 4 measures
    msg = str(err.value)
    assert "archive_dims" in msg and "4 measures" in msg
    with pytest.raises(ConfigError, match="archive_ranges"):
        build_config(sets=["env.id=QDHopperBulletEnv-v0", "env.archive_ranges=[[0, 1], [0, 1]]"])
    # The right length for the env is accepted.
    cfg = build_config(sets=["env.id=QDHopperBulletEnv-v0", "env.archive_dims=[10]"])
    assert cfg.env.resolved_dims() == [10]


def test_unknown_env_lists_choices():
    with pytest.raises(ConfigError) as err:
        build_config(sets=["env.id=Nope-v0"])
    assert "env.id" in str(err.value) and "QDAntBulletEnv-v0" in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'cma_mega_magic'"):
        build_config("cma_mega_magic")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config(sets=["preset=nope"])


@pytest.mark.parametrize("item, fragment", [
    ("td3.batch_size", "td3.batch_size"),
    ("td3..batch_size=3", "td3..batch_size"),
    ("=3", "empty key"),
    (".batch_size=3", ".batch_size"),
])
def test_bad_set_syntax(item, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(sets=[item])
    assert fragment in str(err.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_to_yaml_round_trip(tmp_path, preset):
    cfg = build_config(preset, sets=[
        "seed=3", "env.id=QDWalker2DBulletEnv-v0", "env.archive_dims=[8, 9]",
        "env.archive_ranges=[[0.0, 0.5], [0.25, 1.0]]", "td3.critic_hidden_sizes=[32]",
        "es.num_samples=12", "logging.wandb_group=grp", "evaluations=5000",
    ])
    text = to_yaml(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    again = build_config(file=path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert to_yaml(again) == text


def test_validate_assignment():
    cfg = build_config()
    with pytest.raises(ValueError):
        cfg.td3.batch_size = -3
    assert cfg.td3.batch_size == 256


def test_explicit_preset_wins_over_file_label(tmp_path):
    from dqd_ray.config import build_config

    f = tmp_path / "c.yaml"
    f.write_text("preset: cma_mega_es\nseed: 3\n")
    cfg = build_config("cma_mega_td3", file=f)
    assert cfg.preset == "cma_mega_td3" and cfg.algorithm.gradients == "td3" and cfg.seed == 3
    assert build_config(file=f).algorithm.gradients == "es"
