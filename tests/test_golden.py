"""Seeded episodes stay what they were: the environments against the stored
golden trajectories (bit for bit, rewards to reduction rounding), and the
rollout worker's recorded transitions against the environment stepped by hand
(bit for bit: one process, one binary)."""

from __future__ import annotations

import golden
import numpy as np
import pytest

from dqd_ray.envs import ENV_IDS, QDLocomotionEnv
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.rollout import RolloutWorker


@pytest.fixture(scope="module")
def stored():
    with np.load(golden.PATH, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# Per-step reward tolerance against the stored file. The reward's electricity cost
# is a sum (np.abs(a * speeds).sum()) and a dot product (np.dot(a, a)) over at most
# 8 joints; numpy and BLAS pick their SIMD summation order per CPU, so another x86
# machine (AVX-512) gives the stored rewards +-1 ulp (seen: 1.1e-16 on QD Ant, 2.2e-16
# on QD HalfCheetah). Any order of summing n <= 8 terms stays within (n - 1) * 2^-53
# * sum|terms| of any other: sum|a * speed| <= 6 in these episodes, so every reordering
# of both reductions moves a reward by < 1e-14 (re-summed with math.fsum in reverse
# order: at most 4.4e-16 here). 1e-12 leaves a factor of 100 of room and still
# catches any real change of the reward: scaling any one of its three cost
# coefficients by (1 + 1e-9) moves some stored reward of every env by 5.6e-11 or more
# (a term dropped or added, another DT or alive bonus: by far more). Everything else
# stored (observations, measures, flags, lengths) is physics and elementwise float
# arithmetic, its only sums Python loops in a fixed order: it stays exact.
REWARD_ATOL = 1e-12


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_environment_reproduces_its_golden_trajectories(env_id, stored):
    now = golden.record(env_id)
    for key, value in now.items():
        ref = stored[f"{env_id}/{key}"]
        assert value.shape == ref.shape, f"{env_id} {key}: shape {value.shape} != {ref.shape}"
        if key == "reward":
            np.testing.assert_allclose(value, ref, rtol=0, atol=REWARD_ATOL,
                                       err_msg=f"{env_id} reward differs from the golden "
                                       "trajectory by more than reduction rounding")
        else:
            # Exact: not a single bit of an observation, measure or flag may move.
            assert np.array_equal(value, ref), \
                f"{env_id} {key} differs from the golden trajectory"
    assert now["flags"][:, 0].any() or now["flags"][:, 1].any()


def _by_hand(env_id, genome, spec, seed, max_steps, time_limit_done):
    env = QDLocomotionEnv(env_id, max_episode_steps=max_steps)
    obs, _ = env.reset(seed=seed)
    rows = {"obs": [], "action": [], "reward": [], "next_obs": [], "terminated": []}
    while True:
        a = spec.forward_many_np(genome[None], obs[None])[0]
        nxt, r, term, trunc, info = env.step(a)
        rows["obs"].append(obs)
        rows["action"].append(a)
        rows["reward"].append([r, *info["measures_step"]])
        rows["next_obs"].append(nxt)
        rows["terminated"].append(float(term or (trunc and time_limit_done)))
        obs = nxt
        if term or trunc:
            break
    out = {k: np.asarray(v, np.float32) for k, v in rows.items()}
    return out, env.episode_return, info["measures"], env._t


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("time_limit_done", [False, True])
def test_rollout_worker_records_exactly_what_the_environment_does(env_id, time_limit_done):
    spec = PolicySpec.from_config(env_id, type("P", (), {"hidden_sizes": (16, 16),
                                                         "activation": "tanh"})())
    rng = np.random.default_rng(3)
    genomes = np.stack([spec.init_genome(rng) * s for s in (0.3, 1.0, 3.0)])
    seeds = np.array([11, 12, 13])
    worker = RolloutWorker(env_id, spec, num_envs=2, episode_length=60, chunk_size=50,
                           time_limit_done=time_limit_done)
    res = worker.evaluate(genomes, seeds)
    worker.close()
    # Keyless transitions interleave the envs: regroup them per genome by
    # replaying each genome by hand and matching its rows in order.
    got = {k: np.concatenate([c[k] for c in res["transitions"]]) for k in res["transitions"][0]}
    assert len(got["obs"]) == res["env_steps"] == res["length"].sum()
    used = np.zeros(len(got["obs"]), bool)
    for gi in range(len(genomes)):
        want, ret, meas, length = _by_hand(env_id, genomes[gi], spec, int(seeds[gi]), 60,
                                           time_limit_done)
        assert res["fitness"][gi] == ret and res["length"][gi] == length
        assert np.array_equal(res["measures"][gi], meas)
        # Rows of this genome: those whose obs and action match, in order.
        pos = 0
        for i in range(len(got["obs"])):
            if pos < length and not used[i] and np.array_equal(got["obs"][i], want["obs"][pos]) \
                    and np.array_equal(got["action"][i], want["action"][pos]):
                for k in want:
                    assert np.array_equal(got[k][i], want[k][pos]), f"{env_id} genome {gi} {k}"
                used[i] = True
                pos += 1
        assert pos == length, f"{env_id} genome {gi}: matched {pos} of {length} transitions"
    assert used.all()
