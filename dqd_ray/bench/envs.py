"""``dqd-ray bench envs``: environment steps/s against a bare pybullet loop.

For each robot, the same fixed sequence of random actions is played (a) through
the environment (observations, rewards, measures, resets on termination) and
(b) through a bare loop on the same loaded robot: set torques, step, read joint
states and ground contacts, resetting at exactly the steps where the
environment's episodes ended. The ratio (a)/(b) is the environment layer's
overhead; runs alternate and the median of the repeats is reported.
"""

from __future__ import annotations

import time

import numpy as np
import pybullet

from dqd_ray.bench.common import machine_info, print_table, write_json
from dqd_ray.envs import ENV_IDS, QDLocomotionEnv, load_robot
from dqd_ray.envs.robots import ROBOTS


def _run_env(env_id: str, actions: np.ndarray, seed: int) -> tuple[float, list[int]]:
    env = QDLocomotionEnv(env_id)
    env.reset(seed=seed)
    ends = []
    start = time.perf_counter()
    env.reset(seed=seed)
    for t, a in enumerate(actions):
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            ends.append(t)
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed, ends


def _run_bare(env_id: str, actions: np.ndarray, ends: list[int], seed: int) -> float:
    spec = ROBOTS[env_id]
    r = load_robot(spec)
    kw = {"physicsClientId": r.client}
    rng = np.random.default_rng(seed)
    ends_set = set(ends)

    def reset():
        pybullet.restoreState(r.state_id, **kw)
        for j in r.joint_ids:
            pybullet.resetJointState(r.body, int(j), float(rng.uniform(-0.1, 0.1)), 0.0, **kw)
            pybullet.setJointMotorControl2(r.body, int(j), pybullet.VELOCITY_CONTROL, force=0, **kw)

    start = time.perf_counter()
    reset()
    for t, a in enumerate(actions):
        pybullet.setJointMotorControlArray(
            r.body, r.joint_ids, pybullet.TORQUE_CONTROL, forces=r.torque_scale * a, **kw
        )
        pybullet.stepSimulation(**kw)
        pybullet.getJointStates(r.body, r.joint_ids, **kw)
        pybullet.getContactPoints(r.body, r.floor, **kw)
        if t in ends_set:
            reset()
    elapsed = time.perf_counter() - start
    pybullet.disconnect(**kw)
    return elapsed


def run(steps: int = 5000, repeats: int = 3, env_ids: tuple[str, ...] = ENV_IDS,
        json_path: str | None = None, seed: int = 0) -> dict:
    rows = []
    for env_id in env_ids:
        act_dim = ROBOTS[env_id].act_dim
        actions = np.random.default_rng(seed).uniform(-1, 1, (steps, act_dim))
        env_times, bare_times, episodes = [], [], 0
        for _ in range(repeats):
            t_env, ends = _run_env(env_id, actions, seed)
            t_bare = _run_bare(env_id, actions, ends, seed)
            env_times.append(t_env)
            bare_times.append(t_bare)
            episodes = len(ends)
        env_sps = steps / float(np.median(env_times))
        bare_sps = steps / float(np.median(bare_times))
        rows.append({
            "env": env_id, "steps": steps, "episodes": episodes,
            "env_steps_per_s": env_sps, "bare_steps_per_s": bare_sps,
            "ratio": env_sps / bare_sps,
        })
    print_table(rows, ["env", "steps", "episodes", "env_steps_per_s", "bare_steps_per_s", "ratio"])
    ant = [r for r in rows if r["env"] == "QDAntBulletEnv-v0"]
    goal = None
    if ant:
        goal = ant[0]["ratio"] >= 0.8
        print(f"goal (QD Ant ratio >= 0.8): {'met' if goal else 'NOT met'} ({ant[0]['ratio']:.3f})")
    payload = {"benchmark": "envs", "machine": machine_info(), "repeats": repeats,
               "results": rows, "goal_ant_ratio_0.8_met": goal}
    write_json(json_path, payload)
    return payload
