"""Seeded episodes stay bit for bit what they were: the environments against
the stored golden trajectories, and the rollout worker's recorded transitions
against the environment stepped by hand."""

from __future__ import annotations

import numpy as np
import pytest

import golden
from dqd_ray.envs import ENV_IDS, QDLocomotionEnv
from dqd_ray.policy import PolicySpec
from dqd_ray.rollout import RolloutWorker


@pytest.fixture(scope="module")
def stored():
    with np.load(golden.PATH, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_environment_reproduces_its_golden_trajectories(env_id, stored):
    now = golden.record(env_id)
    for key, value in now.items():
        ref = stored[f"{env_id}/{key}"]
        assert value.shape == ref.shape, f"{env_id} {key}: shape {value.shape} != {ref.shape}"
        # Exact: not a single bit of an observation, reward or measure may move.
        assert np.array_equal(value, ref), f"{env_id} {key} differs from the golden trajectory"
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
