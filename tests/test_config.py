"""Config layers (preset <- YAML <- --set), validation errors and the YAML round trip."""

from __future__ import annotations

import pytest
import yaml

from dqd_ray.config import (
    PAPER_PRESETS,
    PRESETS,
    ConfigError,
    ExperimentConfig,
    build_config,
    parse_set,
    to_yaml,
)
from dqd_ray.envs import ENV_IDS
from dqd_ray.runtime import algorithm_needs

PRESET_EXPECTATIONS = {
    "cma_mega_td3": ("cma_mega", "td3", True, False),
    "cma_mega_td3_es": ("cma_mega", "td3_es", True, True),
    "cma_mega_es": ("cma_mega", "es", False, True),
    "cma_maega_td3": ("cma_maega", "td3", True, False),
    "pga_me": ("pga_me", None, True, False),
    "map_elites": ("map_elites", None, False, False),
    "me_es": ("me_es", None, False, False),
    "cma_maega_td3_es": ("cma_maega", "td3_es", True, True),
    "sep_cma_mae": ("cma_mae", None, False, False),
    "lm_ma_mae": ("cma_mae", None, False, False),
    "openai_mae": ("cma_mae", None, False, False),
}
MAE_ENGINES = {"sep_cma_mae": "sep_cma_es", "lm_ma_mae": "lm_ma_es", "openai_mae": "openai_es"}


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_presets_build(preset):
    name, gradients, uses_td3, uses_es = PRESET_EXPECTATIONS[preset]
    cfg = build_config(preset)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.preset == preset
    assert cfg.algorithm.name == name
    assert getattr(cfg.algorithm, "gradients", None) == gradients
    assert cfg.uses_td3 is uses_td3
    assert cfg.uses_es is uses_es
    # The YAML dump builds the same config again (what a run directory stores).
    assert build_config(overrides=yaml.safe_load(to_yaml(cfg))) == cfg


def test_preset_list_is_complete():
    assert set(PRESETS) == set(PRESET_EXPECTATIONS)
    assert set(PAPER_PRESETS) <= set(PRESETS)


PAPER_ARCHIVES = {"QDAntBulletEnv-v0": [6, 6, 6, 6], "QDHalfCheetahBulletEnv-v0": [32, 32],
                  "QDHopperBulletEnv-v0": [1000], "QDWalker2DBulletEnv-v0": [32, 32]}


def _evaluations_per_iteration(cfg) -> int:
    a, needs = cfg.algorithm, algorithm_needs(cfg)
    if a.name in ("cma_mega", "cma_maega"):
        es = cfg.es.num_samples if needs.es_rows else 0
        return a.num_emitters * (1 + es + a.batch_size) + int(needs.greedy_insert)
    if a.name == "pga_me":
        return a.iso_batch_size + a.pg_batch_size
    if a.name == "me_es":
        return 2 * a.num_pairs + a.eval_episodes
    if a.name == "cma_mae":
        return a.num_emitters * a.batch_size
    return a.batch_size


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_match_the_official_configuration(preset, env_id):
    """The table of the paper's settings (official gin files), per environment."""
    cfg = build_config(preset, sets=[f"env.id={env_id}"])
    a, t = cfg.algorithm, cfg.td3
    needs = algorithm_needs(cfg)
    # Common to all.
    assert cfg.policy.hidden_sizes == [128, 128] and cfg.policy.activation == "tanh"
    assert a.x0_from_policy_init is True  # Xavier, zero bias
    assert cfg.env.episode_length == 1000
    assert cfg.env.archive_dims == PAPER_ARCHIVES[env_id]
    assert cfg.env.archive_ranges == [(0.0, 1.0)] * len(PAPER_ARCHIVES[env_id])
    assert cfg.evaluations == 1_000_000
    assert cfg.metrics.robustness_every == 1 and cfg.metrics.robustness_episodes == 10
    assert (t.critic_hidden_sizes, t.batch_size, t.gamma, t.tau, t.policy_delay) == \
        ([256, 256], 256, 0.99, 0.005, 2)
    assert (t.target_noise, t.noise_clip, t.lr, t.replay_capacity) == (0.2, 0.5, 3e-4, 1_000_000)
    assert t.time_limit_done is True  # the paper counts a time-limit cut as done
    per_iteration = _evaluations_per_iteration(cfg)
    if preset == "me_es":  # the official 5000 x 100 x 2 leaves out each new theta's episode
        assert cfg.iterations * (per_iteration - 1) == 1_000_000
    else:
        assert cfg.iterations * per_iteration == 1_000_000
    if preset in ("cma_mega_td3_es", "cma_mega_es"):
        assert (a.name, a.num_emitters, a.sigma0, a.lr) == ("cma_mega", 1, 1.0, 1.0)
        assert (a.selection_rule, a.restart_rule, a.normalize_grad) == \
            ("mu", "no_improvement", True)
        assert a.es_engine == "cma_es"
        assert (cfg.es.sigma, cfg.es.num_samples) == (0.02, 100)
        assert per_iteration == 200 and cfg.iterations == 5000
    if preset in MAE_ENGINES:  # the scaling paper's config/algorithms/*_mae.gin
        assert (a.name, a.es_engine, a.num_emitters, a.batch_size) == \
            ("cma_mae", MAE_ENGINES[preset], 5, 40)
        assert (a.sigma0, a.ranker, a.selection_rule, a.restart_rule) == \
            (0.02, "imp", "mu", "basic")
        assert a.archive_learning_rate == 0.001 and a.threshold_min is None  # the QD offset
        assert (a.mirror_sampling, a.adam_lr, a.adam_l2_coeff) == (True, 0.01, 0.005)
        assert per_iteration == 200 and cfg.iterations == 5000
        assert not needs.critic_objectives and not needs.es_rows and not needs.dqd
    if preset == "cma_mega_td3_es":
        assert a.batch_size == 98 and needs.greedy_insert
        assert needs.critic_objectives == (0,) and needs.learner_rows == (0,)
        assert needs.es_rows == tuple(range(1, len(PAPER_ARCHIVES[env_id]) + 1))
        assert t.train_steps_per_iteration == 600 and t.jacobian_states == 65536
        assert cfg.resources.learner_mode == "sync"
    if preset == "cma_mega_es":
        assert a.batch_size == 99 and not needs.greedy_insert
        assert needs.critic_objectives == () and needs.learner_rows == ()
    if preset == "pga_me":
        assert (a.iso_sigma, a.line_sigma, a.iso_batch_size) == (0.005, 0.05, 50)
        assert (a.pg_batch_size, a.pg_steps, a.pg_lr, a.pg_states) == (50, 10, 0.001, 256)
        assert a.init_sigma == 0.02 and needs.pg_variation and needs.critic_objectives == (0,)
        assert t.train_steps_per_iteration == 300 and cfg.iterations == 10000
    if preset == "map_elites":
        assert (a.sigma, a.batch_size) == (0.02, 100) and needs == type(needs)()
        assert cfg.iterations == 10000
    if preset == "me_es":  # the official me_es.gin and config "mees_damage"
        assert (a.num_pairs, a.noise_std, a.learning_rate, a.l2_coeff) == (100, 0.02, 0.01, 0.005)
        assert (a.consecutive_steps, a.novelty_k, a.mode) == (10, 10, "explore_exploit")
        assert (a.explore_strategy, a.exploit_strategy) == ("novelty_bias",
                                                            "best2inlast5_or_best")
        assert (a.action_noise, a.obs_norm, a.obs_collect_prob) == (0.01, True, 0.001)
        assert a.eval_episodes == 1 and cfg.iterations == 5000
        assert needs == type(needs)(es_steps=True)  # no critics, no learner


def test_algorithm_settings_are_validated_per_algorithm():
    with pytest.raises(ConfigError, match=r"algorithm.iso_sigma: not a setting of algorithm "
                                          r"map_elites \(it belongs to pga_me\)"):
        build_config("map_elites", sets=["algorithm.iso_sigma=0.1"])
    with pytest.raises(ConfigError, match="algorithm.sigma0: not a setting of algorithm pga_me"):
        build_config("pga_me", sets=["algorithm.sigma0=2"])
    with pytest.raises(ConfigError, match="unknown algorithm"):
        build_config(sets=["algorithm.name=mees"])
    with pytest.raises(ConfigError, match="insert_greedy needs a fitness critic"):
        build_config("cma_mega_es", sets=["algorithm.insert_greedy=true"])
    # A section without a name is CMA-MEGA's (the default algorithm).
    assert build_config(overrides={"algorithm": {"batch_size": 8}}).algorithm.name == "cma_mega"


def test_cli_config_prints_the_resolved_config(capsys):
    from dqd_ray.cli import main

    assert main(["config", "--preset", "pga_me", "--set", "env.id=QDHopperBulletEnv-v0"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["algorithm"]["name"] == "pga_me" and cfg["env"]["archive_dims"] == [1000]
    assert build_config(overrides=cfg) == build_config("pga_me",
                                                       sets=["env.id=QDHopperBulletEnv-v0"])
    assert main(["config", "--preset", "map_elites", "--set", "algorithm.pg_lr=1"]) == 2
    assert "not a setting of algorithm map_elites" in capsys.readouterr().err


def test_cma_mega_es_disables_greedy_insertion():
    assert build_config("cma_mega_es").algorithm.greedy is False
    assert build_config("cma_mega_td3").algorithm.greedy is True


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
        sets=["es.sigma=0.05", "policy.hidden_sizes=[32, 16]", "algorithm.normalize_grad=false",
              "env.id=QDHopperBulletEnv-v0", "env.archive_dims=[64]"],
    )
    assert cfg.es.sigma == pytest.approx(0.05)
    assert cfg.policy.hidden_sizes == [32, 16]
    # --set overrides the preset.
    assert cfg.algorithm.normalize_grad is False
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
    with pytest.raises(ConfigError, match="is not a file: pass a YAML file"):
        build_config(file=tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("td3:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML: .* at line 3, column 1"):
        build_config(file=broken)


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
    ("resources.num_rollout_workers=0", "resources.num_rollout_workers"),
    ("resources.num_rollout_workers=-2", "resources.num_rollout_workers"),
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


def test_no_rollout_workers_is_refused_with_the_fix():
    """0 workers used to pass validation and end in an IndexError once the graph
    was built; unset (null) still means one per free CPU."""
    with pytest.raises(ConfigError) as err:
        build_config(sets=["resources.num_rollout_workers=0"])
    assert ("resources.num_rollout_workers: Value error, a run needs at least 1 rollout "
            "worker, got 0: set a positive number, or leave it unset (null)") in str(err.value)
    assert build_config(sets=["resources.num_rollout_workers=null"]).resources \
        .num_rollout_workers is None
    assert build_config(sets=["resources.num_rollout_workers=1"]).resources \
        .num_rollout_workers == 1


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
    ("td3.batch_size=[1,", "the value is not valid YAML (expected the node content"),
    ("env.id={a", "the value is not valid YAML"),
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


def spec_obs_dim(cfg) -> int:
    from dqd_ray.envs import env_metadata

    return env_metadata(cfg.env.id).obs_dim


def _built_scheduler(cfg):
    """The preset's scheduler as the coordinator builds it (no rollouts)."""
    import numpy as np

    from dqd_ray import algorithms
    from dqd_ray.algorithms import BuildContext
    from dqd_ray.roles.policy import PolicySpec

    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    x0 = spec.init_genome(np.random.default_rng(0))
    ctx = BuildContext(solution_dim=spec.genome_dim, x0=x0, archive_dims=cfg.env.archive_dims,
                       archive_ranges=cfg.env.archive_ranges, qd_offset=0.0,
                       seed_sequence=np.random.SeedSequence(1),
                       policy_first_layer=spec.layers[0][2:])
    return algorithms.get(cfg.algorithm.name).build_scheduler(cfg.algorithm, ctx), x0


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_reach_the_emitters_they_build(preset, env_id):
    """The table again, read off the built pyribs emitters: the settings reach them,
    and an empty archive's first batch is x0 plus the paper's noise."""
    import numpy as np
    from ribs.archives import GridArchive
    from ribs.emitters import GaussianEmitter, GradientArborescenceEmitter, IsoLineEmitter
    from ribs.emitters.opt._cma_es import CMAEvolutionStrategy
    from ribs.emitters.opt._gradient_ascent_opt import GradientAscentOpt

    from dqd_ray.algorithms.pga_me_emitter import PolicyGradientEmitter

    cfg = build_config(preset, sets=[f"env.id={env_id}"])
    sched, x0 = _built_scheduler(cfg)
    assert isinstance(sched.archive, GridArchive)
    assert list(sched.archive.dims) == PAPER_ARCHIVES[env_id]
    assert sched.archive.cells == int(np.prod(PAPER_ARCHIVES[env_id]))
    emitters = sched.emitters
    if preset in ("cma_mega_td3_es", "cma_mega_es"):
        assert len(emitters) == 1 and isinstance(emitters[0], GradientArborescenceEmitter)
        e = emitters[0]
        assert isinstance(e._grad_opt, GradientAscentOpt) and e._grad_opt._lr == 1.0
        assert isinstance(e._opt, CMAEvolutionStrategy)  # pyribs' CMA-ES: the paper's
        assert e._sigma0 == 1.0 and e._opt.sigma == 1.0
        assert (e._selection_rule, e._restart_rule, e._normalize_grads) == \
            ("mu", "no_improvement", True)
        assert e.batch_size == (98 if preset == "cma_mega_td3_es" else 99)
        theta = sched.ask_dqd()
        assert theta.shape == (1, len(x0)) and np.array_equal(theta[0], x0.astype(theta.dtype))
    elif preset == "pga_me":
        assert [type(e) for e in emitters] == [IsoLineEmitter, PolicyGradientEmitter]
        iso, pg = emitters
        assert (iso._iso_sigma, iso._line_sigma, iso.batch_size) == (0.005, 0.05, 50)
        assert pg.batch_size == 50
        batch = sched.ask() - x0
        assert batch.shape == (100, len(x0))
        # Empty archive: the iso-line emitter adds its iso noise (pyribs' rule, as the
        # official code), the PG emitter N(0, 0.02^2).
        assert abs(batch[:50].std() - 0.005) < 0.0005 and abs(batch[50:].std() - 0.02) < 0.002
        assert abs(batch.mean()) < 1e-3
    elif preset == "me_es":
        from dqd_ray.algorithms.me_es_emitter import MEESEmitter

        assert len(emitters) == 1 and isinstance(emitters[0], MEESEmitter)
        e = emitters[0]
        assert (e.num_pairs, e.noise_std, e.lr, e.l2_coeff) == (100, 0.02, 0.01, 0.005)
        assert (e.consecutive_steps, e.k, e.action_noise, e.obs_collect_prob) == \
            (10, 10, 0.01, 0.001)
        assert e.obs_dim == spec_obs_dim(cfg) and e.hidden == 128
        np.testing.assert_array_equal(e.theta, x0)
        mean, std = e.obs_stats()  # no observation yet: the identity normalization
        assert not mean.any() and (std == 1.0).all()
        assert sched.ask().shape == (0, len(x0))  # asks for no batch: it steps itself
    elif preset in MAE_ENGINES:
        _assert_mae_scheduler(sched, x0, MAE_ENGINES[preset], qd_offset=0.0)
    else:
        assert len(emitters) == 1 and isinstance(emitters[0], GaussianEmitter)
        assert emitters[0]._sigma == 0.02 and emitters[0].batch_size == 100
        batch = sched.ask() - x0
        assert batch.shape == (100, len(x0)) and abs(batch.std() - 0.02) < 0.002


def _assert_mae_scheduler(sched, x0, engine: str, qd_offset: float) -> None:
    """The scaling paper's CMA-MAE, read off the built pyribs objects."""
    import numpy as np
    from ribs.emitters import EvolutionStrategyEmitter
    from ribs.emitters.opt import (
        LMMAEvolutionStrategy,
        OpenAIEvolutionStrategy,
        SeparableCMAEvolutionStrategy,
    )
    from ribs.emitters.rankers import ImprovementRanker

    engines = {"sep_cma_es": SeparableCMAEvolutionStrategy, "lm_ma_es": LMMAEvolutionStrategy,
               "openai_es": OpenAIEvolutionStrategy}
    archive, result = sched.archive, sched.result_archive
    assert archive.learning_rate == 0.001 and archive.threshold_min == qd_offset
    assert result is not None and result is not archive
    assert result.learning_rate == 1.0 and result.threshold_min == -np.inf  # best per cell
    assert len(sched.emitters) == 5
    for e in sched.emitters:
        assert isinstance(e, EvolutionStrategyEmitter) and e.archive is archive
        assert isinstance(e._opt, engines[engine]) and isinstance(e._ranker, ImprovementRanker)
        assert (e.batch_size, e._sigma0, e._selection_rule, e._restart_rule) == \
            (40, 0.02, "mu", "basic")
        np.testing.assert_array_equal(e.x0, x0)  # all start from one x0
        if engine == "openai_es":
            assert e._opt.mirror_sampling
            assert (e._opt.adam_opt._lr, e._opt.adam_opt._l2_coeff) == (0.01, 0.005)
    batch = sched.ask()
    assert batch.shape == (200, len(x0))
    assert abs((batch - x0).std() - 0.02) < 0.002  # sigma0 around x0
    # Five emitters with their own seeds: five different first batches.
    firsts = {batch[i * 40].tobytes() for i in range(5)}
    assert len(firsts) == 5
