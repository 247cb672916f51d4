"""The four QD locomotion environments on real pybullet physics."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dqd_ray.envs as envs
from dqd_ray.envs import ENV_IDS, QDLocomotionEnv

TABLE = {
    "QDAntBulletEnv-v0": (28, 8, 4),
    "QDHalfCheetahBulletEnv-v0": (26, 6, 2),
    "QDHopperBulletEnv-v0": (15, 3, 1),
    "QDWalker2DBulletEnv-v0": (22, 6, 2),
}


def rollout(env, seed, steps, actions=None):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards, infos = [], []
    rng = np.random.default_rng(seed)
    for t in range(steps):
        a = rng.uniform(-1, 1, env.action_space.shape) if actions is None else actions[t]
        obs, r, term, trunc, info = env.step(a)
        out.append(obs)
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            break
    return np.array(out), np.array(rewards), infos, term, trunc


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_spaces_and_metadata(env_id):
    obs_dim, act_dim, m_dim = TABLE[env_id]
    env = gym.make(env_id)
    assert env.observation_space.shape == (obs_dim,)
    assert env.action_space.shape == (act_dim,)
    base = env.unwrapped
    assert base.measure_dim == m_dim
    assert len(base.measure_names) == m_dim
    assert base.measure_ranges == tuple((0.0, 1.0) for _ in range(m_dim))
    obs, info = env.reset(seed=1)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    env.close()


def test_metadata_values():
    ant = envs.env_metadata("QDAntBulletEnv-v0")
    assert ant.archive_dims == (6, 6, 6, 6) and ant.qd_offset == -374.702526595403
    assert envs.env_metadata("QDHopperBulletEnv-v0").archive_dims == (1000,)
    assert envs.env_metadata("QDHalfCheetahBulletEnv-v0").qd_offset == -2797.5195251991777
    assert envs.env_metadata("QDWalker2DBulletEnv-v0").reward_threshold == 2500
    with pytest.raises(ValueError, match="unknown env id"):
        envs.env_metadata("QDCartpole-v0")


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(env_id):
    env = QDLocomotionEnv(env_id)
    check_env(env, skip_render_check=True)
    env.close()


def test_module_prefixed_make():
    env = gym.make("dqd_ray.envs:QDHopperBulletEnv-v0")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (15,)
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_determinism_under_seed(env_id):
    a, b = QDLocomotionEnv(env_id), QDLocomotionEnv(env_id)
    obs_a, rew_a, *_ = rollout(a, seed=3, steps=200)
    # An episode run in between must not leak into the next seeded episode.
    rollout(b, seed=99, steps=50)
    obs_b, rew_b, *_ = rollout(b, seed=3, steps=200)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    obs_c, *_ = rollout(a, seed=4, steps=20)
    assert not np.array_equal(obs_c[0], obs_a[0])
    a.close()
    b.close()


def test_truncation_at_exactly_1000_steps():
    env = QDLocomotionEnv("QDHalfCheetahBulletEnv-v0")  # never terminates
    env.reset(seed=0)
    for t in range(1000):
        _, _, term, trunc, _ = env.step(np.zeros(6))
        assert not term
        assert trunc == (t == 999)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(6))
    env.close()


def test_custom_episode_limit():
    env = QDLocomotionEnv("QDAntBulletEnv-v0", max_episode_steps=7)
    env.reset(seed=0)
    flags = [env.step(np.zeros(8))[3] for _ in range(7)]
    assert flags == [False] * 6 + [True]
    with pytest.raises(ValueError, match="max_episode_steps"):
        QDLocomotionEnv("QDAntBulletEnv-v0", max_episode_steps=0)


@pytest.mark.parametrize("env_id", ["QDHopperBulletEnv-v0", "QDWalker2DBulletEnv-v0"])
def test_falling_robot_terminates(env_id):
    env = QDLocomotionEnv(env_id)
    _, rewards, infos, term, trunc = rollout(env, seed=0, steps=1000)
    assert term and not trunc
    assert len(rewards) < 1000
    assert infos[-1]["reward_alive"] == -1.0
    assert all(i["reward_alive"] == 1.0 for i in infos[:-1])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(env.action_space.shape))
    env.close()


def test_ant_terminates_exactly_when_torso_low():
    # With no torque the ant drops flat onto its torso (radius 0.25).
    env = QDLocomotionEnv("QDAntBulletEnv-v0")
    env.reset(seed=0)
    heights = []
    for _ in range(200):
        obs, _, term, trunc, info = env.step(np.zeros(8))
        heights.append(obs[0] + env._initial_z)
        if term:
            break
    assert term and not trunc
    assert info["reward_alive"] == -1.0
    assert heights[-1] <= 0.26 and all(h > 0.26 for h in heights[:-1])
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_measures_are_mean_of_step_contacts(env_id):
    env = QDLocomotionEnv(env_id)
    _, _, infos, _, _ = rollout(env, seed=5, steps=300)
    steps = np.array([i["measures_step"] for i in infos])
    assert set(np.unique(steps)) <= {0.0, 1.0}
    final = infos[-1]["measures"]
    assert np.all((final >= 0) & (final <= 1))
    np.testing.assert_allclose(final, steps.mean(axis=0))
    env.close()


def test_reward_components_sum():
    env = QDLocomotionEnv("QDAntBulletEnv-v0")
    env.reset(seed=0)
    _, r, _, _, info = env.step(np.full(8, 0.5))
    parts = ["reward_alive", "reward_progress", "reward_electricity", "reward_joints_at_limit"]
    assert r == pytest.approx(sum(info[p] for p in parts))
    assert info["reward_electricity"] < 0
    env.close()


def test_walking_forward_earns_progress():
    env = QDLocomotionEnv("QDHalfCheetahBulletEnv-v0")
    env.reset(seed=0)
    # Push the whole robot forward: progress is speed toward the target.
    import pybullet

    r = env._robot
    pybullet.resetBaseVelocity(r.body, [0, 0, 0], physicsClientId=r.client)
    pybullet.resetJointState(r.body, 0, 0.0, 2.0, physicsClientId=r.client)  # slider x
    _, _, _, _, info = env.step(np.zeros(6))
    assert info["reward_progress"] > 0.5
    env.close()


def test_bad_actions():
    env = QDLocomotionEnv("QDAntBulletEnv-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, 0, np.nan, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, 0, np.inf, 0, 0, 0, 0, 0]))
    # Out-of-range actions are clipped: same result as the clipped action.
    b = QDLocomotionEnv("QDAntBulletEnv-v0")
    b.reset(seed=0)
    env.reset(seed=0)
    big = np.array([3.0, -7, 0.5, 2, -2, 0, 1, -1])
    o1, r1, *_ = env.step(big)
    o2, r2, *_ = b.step(np.clip(big, -1, 1))
    np.testing.assert_array_equal(o1, o2)
    assert r1 == r2
    env.close()
    b.close()


def test_step_before_reset_raises():
    env = QDLocomotionEnv("QDHopperBulletEnv-v0")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3))


def test_unknown_id_and_render_mode():
    with pytest.raises(ValueError, match="unknown env id"):
        QDLocomotionEnv("QDSnake-v0")
    with pytest.raises(ValueError, match="render_mode"):
        QDLocomotionEnv("QDAntBulletEnv-v0", render_mode="human")


def test_render_rgb_array():
    env = QDLocomotionEnv("QDAntBulletEnv-v0", render_mode="rgb_array",
                          render_width=64, render_height=48)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert frame.std() > 0  # not a blank image
    env.close()


def test_many_envs_one_process_and_close():
    many = [QDLocomotionEnv("QDHopperBulletEnv-v0") for _ in range(8)]
    for i, e in enumerate(many):
        e.reset(seed=i)
    clients = {e._robot.client for e in many}
    assert len(clients) == 8
    for e in many:
        e.close()
        assert e._robot is None
    # A closed env can be reset again (new client).
    many[0].reset(seed=0)
    many[0].close()
