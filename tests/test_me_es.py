"""ME-ES: folding the observation statistics, novelty, cell choice, the rollout
options it uses, and generations on real pybullet physics (in process)."""

from __future__ import annotations

import numpy as np
import pytest

from dqd_ray.algorithms.me_es import MEESConfig
from dqd_ray.algorithms.me_es_emitter import MEESEmitter, fold, novelty, unfold
from dqd_ray.config import build_config
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.rollout import RolloutWorker

HOPPER = "QDHopperBulletEnv-v0"


def test_folded_genome_on_raw_observations_is_theta_on_normalized_ones():
    spec = PolicySpec(15, 3, (8, 8))
    rng = np.random.default_rng(0)
    theta = spec.init_genome(rng).astype(np.float64)
    theta[spec.layers[0][1]] = rng.normal(size=8)  # a non-zero first bias
    mean, std = rng.normal(size=15), rng.uniform(0.1, 3.0, size=15)
    obs = rng.normal(size=(32, 15)) * 3
    folded = fold(theta, mean, std, hidden=8)
    want = spec.forward_many_np(theta[None], (obs - mean) / std)
    got = spec.forward_many_np(folded[None], obs)
    np.testing.assert_allclose(got, want, atol=1e-6)  # the forward runs in float32
    assert not np.allclose(folded, theta)
    np.testing.assert_allclose(unfold(folded, mean, std, hidden=8), theta, atol=1e-12)
    # Only the first layer changes.
    rest = slice(spec.layers[0][1].stop, None)
    np.testing.assert_array_equal(folded[rest], theta[rest])


def test_novelty_is_the_mean_squared_distance_to_the_k_nearest():
    rng = np.random.default_rng(1)
    archive = rng.uniform(size=(30, 2))
    queries = rng.uniform(size=(5, 2))
    got = novelty(queries, archive, k=4)
    for q, g in zip(queries, got):
        d2 = np.sort(((archive - q) ** 2).sum(axis=1))
        assert g == pytest.approx(d2[:4].mean())
    # A cell's own measures are in the archive: it skips itself.
    own = novelty(archive[:3], archive, k=4, drop_self=True)
    for i, g in enumerate(own):
        d2 = np.sort(((archive - archive[i]) ** 2).sum(axis=1))
        assert d2[0] == 0 and g == pytest.approx(d2[1:4].mean())
    assert np.isinf(novelty(queries, np.zeros((0, 2)), k=4)).all()
    assert novelty(queries, archive[:2], k=10).shape == (5,)  # fewer points than k


def _emitter(**kw):
    from ribs.archives import GridArchive

    archive = GridArchive(solution_dim=4 * 2 + 2, dims=[10], ranges=[(0, 1)],
                          extra_fields={"seed": ((), np.int64)})
    cfg = MEESConfig(**kw)
    return MEESEmitter(archive, np.zeros(10), obs_dim=4, hidden=2, cfg=cfg, seed=0), archive


def test_exploit_cell_choice_follows_best2inlast5_or_best():
    e, archive = _emitter()
    e.cells = np.arange(8)
    e.cell_best_train = np.array([5.0, 9.0, 1.0, 2.0, 3.0, 4.0, 7.0, 0.0])
    e.explore = False
    picks = np.array([e._sample_cell() for _ in range(2000)])
    # Half the time the best overall (1); else one of the 2 best of the 5 newest
    # (cells 3..7: 6 and 5), in proportion to their shifted returns.
    counts = np.bincount(picks, minlength=8) / len(picks)
    assert set(np.flatnonzero(counts)) == {1, 5, 6}
    assert counts[1] == pytest.approx(0.5, abs=0.04)
    shifted = e.cell_best_train + 1 - e.cell_best_train.min()
    assert counts[6] / counts[5] == pytest.approx(shifted[6] / shifted[5], rel=0.2)
    e.cells, e.cell_best_train = np.arange(3), np.array([1.0, 3.0, 2.0])
    assert {e._sample_cell() for _ in range(50)} == {1}  # fewer than 5 cells: the best


def test_explore_cell_choice_is_biased_to_the_5_most_novel():
    e, _ = _emitter()
    e.cells = np.arange(8)
    e.cell_novelty = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.05])
    e.explore = True
    counts = np.bincount([e._sample_cell() for _ in range(4000)], minlength=8) / 4000
    top5 = [1, 3, 4, 6, 5]
    want = np.full(8, 0.1 / 8)
    scores = np.where(np.isin(np.arange(8), top5), e.cell_novelty, 0)
    want += 0.9 * scores / scores.sum()
    np.testing.assert_allclose(counts, want, atol=0.03)


def test_worker_action_noise_repeats_exactly_and_observations_are_summed():
    spec = PolicySpec.from_config(HOPPER, build_config().policy)
    rng = np.random.default_rng(0)
    genomes = np.stack([spec.init_genome(rng) for _ in range(3)])
    seeds = np.array([3, 4, 5])
    worker = RolloutWorker(HOPPER, spec, num_envs=2, episode_length=60)
    plain = worker.evaluate(genomes, seeds, record=False)
    noisy = worker.evaluate(genomes, seeds, record=False, action_noise=0.3,
                            collect_obs=[True, False, True])
    again = worker.evaluate(genomes, seeds, record=False, action_noise=0.3,
                            collect_obs=[True, False, True])
    assert not np.allclose(plain["fitness"], noisy["fitness"])
    for key in ("fitness", "measures", "obs_sum", "obs_sumsq", "obs_count"):
        np.testing.assert_array_equal(noisy[key], again[key])
    # The first observation and one per step, for the collected episodes only.
    np.testing.assert_array_equal(noisy["obs_count"], [noisy["length"][0] + 1, 0,
                                                       noisy["length"][2] + 1])
    assert not noisy["obs_sum"][1].any() and noisy["obs_sumsq"][0].sum() > 0
    # By hand: the same env, the same noise draws.
    from dqd_ray.envs import make_env

    env = make_env(HOPPER, max_episode_steps=60)
    obs, _ = env.reset(seed=3)
    noise = np.random.default_rng((3, 0xAC7))
    total, done = obs.astype(np.float64).copy(), False
    while not done:
        a = spec.forward_many_np(genomes[:1], obs[None].astype(np.float32))[0].astype(np.float64)
        a = np.clip(a + 0.3 * noise.standard_normal(a.shape), -1, 1)
        obs, _, term, trunc, _ = env.step(a)
        total += obs
        done = term or trunc
    assert env.episode_return == pytest.approx(noisy["fitness"][0], abs=1e-9)
    np.testing.assert_allclose(total, noisy["obs_sum"][0], rtol=1e-6)
    with pytest.raises(ValueError, match="one flag per genome"):
        worker.evaluate(genomes, seeds, record=False, collect_obs=[True])


def test_generations_move_theta_fill_the_novelty_archive_and_learn_obs_stats():
    """Real rollouts in process: the first call evaluates x0, every call one
    generation; runs alternate exploit then explore every consecutive_steps."""
    from dqd_ray.runtime import System

    cfg = build_config("me_es", sets=[
        f"env.id={HOPPER}", "env.episode_length=60", "algorithm.num_pairs=4",
        "algorithm.consecutive_steps=2", "algorithm.obs_collect_prob=1.0",
        "metrics.robustness_every=0", "logging.progress_bar=false"])
    system = System(cfg, "inprocess")
    try:
        ms = [system.iteration() for _ in range(5)]
    finally:
        system.close()
    assert [m["iteration_evaluations"] for m in ms] == [10, 9, 9, 9, 9]  # + x0 once
    assert [m["me_es_explore"] for m in ms] == [0, 0, 1, 1, 0]
    assert [m["me_es_novelty_archive"] for m in ms] == [2, 3, 4, 5, 6]
    assert ms[-1]["num_elites"] >= 2
    assert ms[-1]["me_es_obs_count"] > ms[0]["me_es_obs_count"] > 1
    assert all(m["me_es_grad_norm"] > 0 for m in ms)
    emitter = system.coordinator.scheduler.emitters[0]
    mean, std = emitter.obs_stats()
    assert (std >= 0.1).all() and np.abs(mean).max() > 0.01
    # Each cell keeps the statistics its genome was folded with.
    assert len(emitter.cells) == ms[-1]["num_elites"] == len(emitter.cell_obs_std)


# -- the ES step climbs: return when exploiting, novelty when exploring --------------------
#
# The real emitter and a real pyribs archive, evaluated by a deterministic function of
# the genome (the evaluator is not under test): the return is a sphere around TARGET,
# the measures a smooth squashing of the first two genome values.

DIM = 8  # a 2-input, 2-unit first layer (6 values) and 2 more
TARGET = np.linspace(-1.0, 1.0, DIM)


def _return_of(genomes):
    return -((np.atleast_2d(genomes) - TARGET) ** 2).sum(axis=1)


def _measures_of(genomes):
    return 0.5 + 0.25 * np.tanh(np.atleast_2d(genomes)[:, :2])


def _evaluate(genomes, **options):
    """Deterministic: action noise and observation collection do not apply."""
    g = np.asarray(genomes, np.float64)
    return {"fitness": _return_of(g), "measures": _measures_of(g),
            "valid": np.ones(len(g), bool), "seed": np.arange(len(g))}


def _climber(mode: str, seed: int = 0):
    from ribs.archives import GridArchive

    archive = GridArchive(solution_dim=DIM, dims=[20, 20], ranges=[(0, 1), (0, 1)],
                          extra_fields={"seed": ((), np.int64)})
    # One run (no restart from another cell) and no observation statistics, so theta
    # is the genome evaluated; the rest are the paper's settings.
    cfg = MEESConfig(mode=mode, num_pairs=30, consecutive_steps=1000, obs_norm=False)
    return MEESEmitter(archive, np.zeros(DIM), obs_dim=2, hidden=2, cfg=cfg, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_exploit_steps_raise_the_return_of_theta(seed):
    """Each exploit generation moves theta uphill on the return it ranks by. A sign
    error in the step (descending the return) lowers it at every step instead."""
    e = _climber("exploit", seed)
    start = _return_of(e.theta)[0]
    gains = []
    for _ in range(20):
        before = _return_of(e.theta)[0]
        m = e.step(_evaluate)
        assert m["me_es_explore"] == 0
        after = _return_of(e.theta)[0]
        assert m["me_es_theta_fitness"] == pytest.approx(after)  # theta, inserted
        gains.append(after - before)
    # Measured: every one of the 20 steps gains 0.06 to 0.1 (Adam moves each
    # coordinate about learning_rate toward TARGET): ask for 18 and half the total.
    assert sum(g > 0 for g in gains) >= 18, np.round(gains, 4)
    assert _return_of(e.theta)[0] - start > 0.7, (start, _return_of(e.theta)[0])
    assert e.archive.best_elite["objective"] > start


@pytest.mark.parametrize("seed", [0, 1])
def test_explore_steps_raise_the_novelty_of_theta(seed):
    """Each explore generation moves theta's measures away from the novelty archive
    it ranks by: theta's novelty against the archive of that step (measures of every
    theta so far, its own included) is higher after the step than before. A sign
    error (descending the novelty) pulls theta back toward the visited measures."""
    e = _climber("explore", seed)
    start = _measures_of(e.theta)[0]
    ratios = []
    for i in range(20):
        theta, visited = e.theta.copy(), e.ns_bcs.copy()
        m = e.step(_evaluate)
        assert m["me_es_explore"] == 1
        assert len(e.ns_bcs) == len(visited) + (2 if i == 0 else 1)  # x0 once, then theta
        if i == 0:
            continue  # x0's measures joined the archive during this call: nothing to compare
        before = novelty(_measures_of(theta), visited, e.k)[0]
        after = novelty(_measures_of(e.theta), visited, e.k)[0]
        ratios.append(after / before)
    # Measured: every one of the 19 steps raises it by 34 % or more; ask for 17 steps.
    assert sum(r > 1 for r in ratios) >= 17, np.round(ratios, 3)
    # Measures keep moving away from x0's: about 0.067 after 20 steps of ~0.0035.
    assert np.linalg.norm(_measures_of(e.theta)[0] - start) > 0.03
