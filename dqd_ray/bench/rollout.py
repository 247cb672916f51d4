"""``dqd-ray bench rollout``: the whole rollout path against a bare pybullet loop.

For each environment, in one run and alternating, median of the repeats:

- **worker**: a :class:`RolloutWorker` (one env) evaluates random policies
  (Xavier genomes, one episode each, up to 1000 steps) and records every
  transition into a sink that drops the chunks: env step, reward, measures,
  observation, policy forward, transition recording and resets;
- **bare**: the same episodes replayed on the same MJCF robot doing only what
  an observation needs: set torques, one ``stepSimulation`` (4 substeps),
  joint states, the torso's state with velocity, the feet contacts; on reset
  ``restoreState`` plus the same joint noise. The actions are the ones the
  worker's policies took (captured in a first pass), so both loops simulate
  exactly the same trajectories.

``ratio`` is bare time / worker time (1.0: the rollout path costs nothing on
top of the simulator); ``ratio_4envs`` the same episodes on a worker stepping
4 envs in lockstep (the default ``resources.envs_per_worker``);
``ratio_streaming`` the same episodes the way a run drives them (without
``--no-stream``): a Ray rollout actor with 4 envs, fed by the run's
``PooledEvaluator`` (chunks of 4 genomes, more when episodes are short),
streaming every transition keyed per genome to a replay actor that commits
them after the batch, timed from the caller, after one untimed batch. The goal holds when every
measured path reaches it. The per-step
split times each part alone on the same data: physics (``stepSimulation``
inside the bare loop), the bare loop's reads, the environment layer's own
Python (env replay minus bare loop), policy forward, transition recording,
and what is left for the worker's loop; and the cost of one reset in the
environment and in the bare loop.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import pybullet
from gymnasium.utils import seeding

from dqd_ray.bench.common import machine_info, print_table, write_json
from dqd_ray.envs import ENV_IDS, QDLocomotionEnv, load_robot
from dqd_ray.envs.robots import ROBOTS
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.rollout import RolloutWorker, _ChunkBuilder

GOAL = 0.8


def _capture(worker: RolloutWorker, genomes: np.ndarray, seeds: np.ndarray):
    """Per genome: (actions, obs) of its episode, from a keyed recording pass."""
    parts: dict[tuple, dict] = {}
    worker.set_sink(lambda chunk, key=None: parts.__setitem__(key, chunk))
    res = worker.evaluate(genomes, seeds, keys=list(range(len(genomes))))
    worker.set_sink(None)
    episodes = []
    for gi in range(len(genomes)):
        keys = sorted(k for k in parts if k[0] == gi)
        acts = np.concatenate([parts[k]["action"] for k in keys])
        obs = np.concatenate([parts[k]["obs"] for k in keys])
        episodes.append((acts, obs))
    return res, episodes


def _bare(env_id: str, episodes, seeds) -> dict[str, float]:
    spec = ROBOTS[env_id]
    r = load_robot(spec)
    kw = {"physicsClientId": r.client}
    body, joints, floor, torso = r.body, r.joint_ids, r.floor, r.torso_link
    scale = r.torque_scale
    physics = reset_s = 0.0
    start = time.perf_counter()
    for (actions, _), seed in zip(episodes, seeds):
        t0 = time.perf_counter()
        rng, _ = seeding.np_random(int(seed))
        pybullet.restoreState(r.state_id, **kw)
        for j in joints:
            pybullet.resetJointState(body, int(j), float(rng.uniform(-0.1, 0.1)), 0.0, **kw)
            pybullet.setJointMotorControl2(body, int(j), pybullet.VELOCITY_CONTROL, force=0, **kw)
        pybullet.getJointStates(body, joints, **kw)
        reset_s += time.perf_counter() - t0
        for a in actions:
            pybullet.setJointMotorControlArray(body, joints, pybullet.TORQUE_CONTROL,
                                               forces=scale * a, **kw)
            t1 = time.perf_counter()
            pybullet.stepSimulation(**kw)
            physics += time.perf_counter() - t1
            pybullet.getJointStates(body, joints, **kw)
            if torso < 0:
                pybullet.getBasePositionAndOrientation(body, **kw)
                pybullet.getBaseVelocity(body, **kw)
            else:
                pybullet.getLinkState(body, torso, computeLinkVelocity=1, **kw)
            pybullet.getContactPoints(body, floor, **kw)
    total = time.perf_counter() - start
    pybullet.disconnect(**kw)
    return {"total": total, "physics": physics, "reset": reset_s}


def _env_replay(env_id: str, episodes, seeds) -> dict[str, float]:
    env = QDLocomotionEnv(env_id)
    env.reset(seed=0)
    reset_s = 0.0
    start = time.perf_counter()
    for (actions, _), seed in zip(episodes, seeds):
        t0 = time.perf_counter()
        env.reset(seed=int(seed))
        reset_s += time.perf_counter() - t0
        for a in actions.astype(np.float64):
            env.advance(a)  # what the worker calls: step() less its checks and info dict
    total = time.perf_counter() - start
    env.close()
    return {"total": total, "reset": reset_s}


def _policy(spec: PolicySpec, genomes, episodes) -> float:
    start = time.perf_counter()
    for g, (_, obs) in zip(genomes, episodes):
        g1 = g[None]
        for o in obs:
            spec.forward_many_np(g1, o[None])
    return time.perf_counter() - start


def _recording(spec: PolicySpec, measure_dim: int, episodes) -> float:
    b = _ChunkBuilder(spec.obs_dim, spec.act_dim, 1 + measure_dim, 1000, lambda c: None)
    rew = np.zeros(1 + measure_dim)
    start = time.perf_counter()
    for actions, obs in episodes:
        for a, o in zip(actions, obs):
            b.add(o, a, rew, o, 0.0)
    b.flush()
    return time.perf_counter() - start


class _Streaming:
    """The rollout path as a run drives it: a Ray rollout actor stepping 4 envs
    in lockstep, fed by the run's :class:`PooledEvaluator` (chunks of 4
    genomes, more a call when the last batch's episodes were short; two calls
    queued), streaming every transition, keyed per genome, to a replay actor
    that commits them after the batch (sync learner mode). One untimed batch
    first: the timed ones find the actors started and the evaluator with a
    batch behind it, as a run's iterations do."""

    def __init__(self, env_id: str, spec: PolicySpec, episode_length: int,
                 genomes: np.ndarray, seeds: np.ndarray):
        from dqd_ray.roles.replay_actor import ReplayActor, ReplaySink
        from dqd_ray.runtime.evaluator import PooledEvaluator
        from dqd_ray.runtime.placement import OnRay, init_ray

        init_ray()
        meta = ROBOTS[env_id]
        p = OnRay()
        self.replay = p.make(ReplayActor, {"num_cpus": 0, "role": "the replay buffer"},
                             meta.obs_dim, meta.act_dim, 1 + meta.measure_dim, 200_000, seed=0)
        self.worker = p.make(RolloutWorker, {"num_cpus": 0, "role": "rollout worker 0"},
                             env_id, spec, num_envs=4, episode_length=episode_length,
                             sink=ReplaySink(self.replay))
        self.evaluator = PooledEvaluator(p, [self.worker], self.replay, chunk=4, keyed=True)
        self.evaluate(genomes, seeds)  # waits for both actors to start

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = self.evaluator.evaluate(genomes, seeds)
        return time.perf_counter() - t0, out["length"]

    def close(self) -> None:
        import ray

        for h in (self.worker, self.replay):
            ray.kill(h)


POLICIES = ("random", "run")


def _genomes(spec: PolicySpec, policies: str, count: int, seed: int) -> np.ndarray:
    """``random``: Xavier genomes, each its own (many fall at once: short
    episodes, many resets). ``run``: what a CMA-MEGA run's first iterations
    evaluate, one Xavier genome and Gaussian samples around it (sigma 0.02, the
    paper's ES), mostly long episodes of a robot on its feet."""
    if policies == "random":
        return np.stack([spec.init_genome(np.random.default_rng([seed, i]))
                         for i in range(count)])
    if policies == "run":
        rng = np.random.default_rng([seed, 2**20])
        x0 = spec.init_genome(rng)
        return (x0[None] + 0.02 * rng.standard_normal((count, spec.genome_dim))).astype(
            np.float32)
    raise ValueError(f"policies must be one of {POLICIES}, got {policies!r}")


def bench_env(env_id: str, genomes: int = 8, repeats: int = 3, seed: int = 0,
              episode_length: int = 1000, min_steps: int = 4000,
              stream: bool = True, policies: str = "random") -> dict[str, Any]:
    meta = ROBOTS[env_id]
    spec = PolicySpec(meta.obs_dim, meta.act_dim)
    worker = RolloutWorker(env_id, spec, num_envs=1, episode_length=episode_length)
    # At least ``genomes`` episodes and ``min_steps`` steps (random Hoppers fall fast).
    count = genomes
    while True:
        gs = _genomes(spec, policies, count, seed)
        seeds = np.arange(count) + 1000 * seed
        res, episodes = _capture(worker, gs, seeds)
        steps = int(res["env_steps"])
        if steps >= min_steps or count >= 64 * genomes:
            break
        count = min(64 * genomes, int(count * min_steps / max(steps, 1)) + 1)
    genomes = count
    drop = lambda chunk, key=None: None  # noqa: E731
    worker.set_sink(drop)
    # The same episodes on a worker stepping 4 envs in lockstep (the default
    # resources.envs_per_worker): one batched policy forward per step.
    wide = RolloutWorker(env_id, spec, num_envs=4, episode_length=episode_length, sink=drop)
    streaming = _Streaming(env_id, spec, episode_length, gs, seeds) if stream else None
    t = {"worker": [], "worker_4envs": [], "bare": [], "physics": [], "bare_reset": [], "env": [],
         "env_reset": [], "policy": [], "recording": [], "streaming": []}
    for _ in range(repeats):
        if streaming is not None:
            dt, length = streaming.evaluate(gs, seeds)
            t["streaming"].append(dt)
            if not np.array_equal(length, res["length"]):
                raise RuntimeError(f"{env_id}: episodes changed on the streaming path")
        t0 = time.perf_counter()
        again = worker.evaluate(gs, seeds)
        t["worker"].append(time.perf_counter() - t0)
        if not np.array_equal(again["length"], res["length"]):
            raise RuntimeError(f"{env_id}: episodes changed between passes")
        t0 = time.perf_counter()
        again = wide.evaluate(gs, seeds)
        t["worker_4envs"].append(time.perf_counter() - t0)
        if not np.array_equal(again["length"], res["length"]):
            raise RuntimeError(f"{env_id}: episodes changed with 4 envs per worker")
        b = _bare(env_id, episodes, seeds)
        t["bare"].append(b["total"])
        t["physics"].append(b["physics"])
        t["bare_reset"].append(b["reset"])
        e = _env_replay(env_id, episodes, seeds)
        t["env"].append(e["total"])
        t["env_reset"].append(e["reset"])
        t["policy"].append(_policy(spec, gs, episodes))
        t["recording"].append(_recording(spec, meta.measure_dim, episodes))
    worker.close()
    wide.close()
    if streaming is not None:
        streaming.close()
    m = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
    us = 1e6 / steps
    row = {
        "env": env_id, "episodes": genomes, "steps": steps,
        "worker_steps_per_s": steps / m["worker"], "bare_steps_per_s": steps / m["bare"],
        "ratio": m["bare"] / m["worker"],
        "ratio_4envs": m["bare"] / m["worker_4envs"],
        "ratio_streaming": m["bare"] / m["streaming"],
        "physics_us": m["physics"] * us,
        "bare_reads_us": (m["bare"] - m["physics"] - m["bare_reset"]) * us,
        "env_python_us": (m["env"] - m["env_reset"] - (m["bare"] - m["bare_reset"])) * us,
        "policy_us": m["policy"] * us, "recording_us": m["recording"] * us,
        "worker_loop_us": (m["worker"] - m["env"] - m["policy"] - m["recording"]) * us,
        "env_reset_ms": m["env_reset"] / genomes * 1e3,
        "bare_reset_ms": m["bare_reset"] / genomes * 1e3,
        "repeats": repeats, "raw_s": t,
    }
    return row


def run(env_ids: tuple[str, ...] = ENV_IDS, genomes: int = 8, repeats: int = 3, seed: int = 0,
        min_steps: int = 4000, stream: bool = True, policies: tuple[str, ...] = ("random",),
        json_path: str | None = None) -> dict[str, Any]:
    rows = []
    for kind in policies:
        for env_id in env_ids:
            row = bench_env(env_id, genomes=genomes, repeats=repeats, seed=seed,
                            min_steps=min_steps, stream=stream, policies=kind)
            row["policies"] = kind
            rows.append(row)
            print(f"  {env_id} ({kind} policies): ratio {row['ratio']:.3f} "
                  f"({row['steps']} steps)", flush=True)
    from dqd_ray.envs import compiled

    st = compiled.status()
    print(f"Rollout path vs bare pybullet loop (median of {repeats}; ratio = bare time / "
          f"worker time; per-step times in microseconds, resets in ms); env step: "
          + ("compiled (C)" if st["compiled"] else f"Python ({st['reason']})"))
    print_table(rows, ["env", "policies", "steps", "worker_steps_per_s", "bare_steps_per_s",
                       "ratio", "ratio_4envs", "ratio_streaming"])
    print_table(rows, ["env", "policies", "physics_us", "bare_reads_us", "env_python_us",
                       "policy_us", "recording_us", "worker_loop_us", "env_reset_ms",
                       "bare_reset_ms"])
    # The goal holds for the path a run takes: streaming when measured.
    worst: dict[str, float] = {}
    for r in rows:
        paths = [v for v in (r["ratio"], r["ratio_4envs"], r["ratio_streaming"]) if v == v]
        worst[r["env"]] = min([worst.get(r["env"], float("inf")), *paths])
    met = {k: v >= GOAL for k, v in worst.items()}
    print(f"goal (every path's ratio >= {GOAL} on every env): "
          + ("met" if all(met.values()) else "NOT met: " + ", ".join(k for k, v in met.items()
                                                                    if not v)))
    payload = {"benchmark": "rollout", "machine": machine_info(), "goal_ratio": GOAL,
               "results": rows, "goal_met": all(met.values())}
    write_json(json_path, payload)
    return payload
