"""``dqd-ray bench coordinator``: the coordinator's own work per iteration, alone.

A :class:`~dqd_ray.roles.coordinator.Coordinator` at a preset's settings (default
CMA-MEGA (TD3, ES) on QD Ant: ask_dqd, 100 ES samples and their estimate over
21,256 parameters, tell_dqd, 98 branches, the greedy actor's insertion, tell,
robustness bookkeeping, metrics) runs in this process with stand-ins for what
other roles do: the evaluator returns random fitness and measures after a
short sleep (``--rollout-s``, as rollouts would take: work the coordinator
draws ahead in a thread is hidden behind it, as in a run), the learner returns
random gradient rows and a random greedy actor. What is timed is the
coordinator alone: the wall time of each iteration less the stand-ins' sleep,
and the CPU time of its thread; ``--profile N`` prints cProfile's N heaviest
functions. ``bench iteration``'s ``coordinator_s`` is the same work inside a
real run, with the calls to the other roles and staging included.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from typing import Any

import numpy as np

from dqd_ray.bench.common import machine_info, write_json


class _Rollouts:
    genome_dtype = np.float32  # as the pooled evaluator

    def __init__(self, measure_dim: int, rollout_s: float, rng: np.random.Generator):
        self.k, self.rollout_s, self.rng, self.slept = measure_dim, rollout_s, rng, 0.0

    def evaluate(self, genomes, seeds, record: bool = True, **options) -> dict:
        # The coordinator's side of the pooled evaluator: the genomes as the
        # float32 array the rollout workers get.
        genomes = np.ascontiguousarray(genomes, np.float32)
        n = len(genomes)
        time.sleep(self.rollout_s)
        self.slept += self.rollout_s
        return {"fitness": self.rng.normal(500.0, 200.0, n),
                "measures": self.rng.uniform(0.0, 1.0, (n, self.k)),
                "length": np.full(n, 1000), "valid": np.ones(n, bool), "env_steps": 1000 * n}


class _Gradients:
    def __init__(self, rows: list[int], dim: int, rng: np.random.Generator):
        self.rows, self.dim, self.rng = rows, dim, rng

    def stage_training(self, n: int):
        from dqd_ray.roles import StagedTraining

        return StagedTraining(lambda: {"updates": n, "train_s": 0.0})

    def jacobian(self, thetas: np.ndarray) -> np.ndarray:
        return self.rng.normal(size=(len(thetas), len(self.rows), thetas.shape[1]))

    def greedy_genome(self) -> np.ndarray:
        return self.rng.normal(0.0, 0.1, self.dim).astype(np.float32)


def run(preset: str = "cma_mega_td3_es", env_id: str = "QDAntBulletEnv-v0",
        iterations: int = 15, warmup: int = 3, rollout_s: float = 0.05, profile: int = 0,
        sets: list[str] | None = None, json_path: str | None = None) -> dict[str, Any]:
    from dqd_ray.config import build_config
    from dqd_ray.envs import env_metadata
    from dqd_ray.roles.coordinator import Coordinator
    from dqd_ray.roles.es_gradients import ESGradient
    from dqd_ray.roles.policy import PolicySpec

    cfg = build_config(preset, sets=[f"env.id={env_id}", *(sets or [])])
    meta = env_metadata(cfg.env.id)
    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    needs = cfg.needs()
    rng = np.random.default_rng(0)
    rollouts = _Rollouts(meta.measure_dim, rollout_s, rng)
    learner = _Gradients(list(needs.learner_rows), spec.genome_dim, rng) \
        if needs.learner_rows or needs.greedy_insert or needs.critic_updates else None
    es = ESGradient(cfg.es.sigma, cfg.es.num_samples, seed=1) if needs.es_rows else None
    coord = Coordinator(
        solution_dim=spec.genome_dim, x0=spec.init_genome(rng),
        archive_dims=cfg.env.resolved_dims(), archive_ranges=cfg.env.resolved_ranges(),
        qd_offset=meta.qd_offset, algorithm=cfg.algorithm, evaluator=rollouts, learner=learner,
        learner_rows=learner.rows if learner else None, es=es,
        td3_updates=cfg.td3.train_steps_per_iteration if learner else 0, seed=0,
        max_fitness=meta.max_fitness, robustness_every=cfg.metrics.robustness_every,
        robustness_episodes=cfg.metrics.robustness_episodes,
        policy_first_layer=spec.layers[0][2:])
    for _ in range(warmup):
        coord.iteration()
    wall, cpu = [], []
    prof = cProfile.Profile() if profile else None
    for _ in range(iterations):
        rollouts.slept = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        if prof:
            prof.enable()
        coord.iteration()
        if prof:
            prof.disable()
        wall.append(time.perf_counter() - t0 - rollouts.slept)
        cpu.append(time.thread_time() - c0)
    row = {"preset": preset, "env": env_id, "solution_dim": spec.genome_dim,
           "elites": int(coord.archive.stats.num_elites), "iterations": iterations,
           "wall_ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu),
           "wall_ms_all": [1e3 * w for w in wall]}
    print(f"{preset} on {env_id} ({spec.genome_dim} parameters, {row['elites']} elites): the "
          f"coordinator's own work per iteration, median of {iterations}: "
          f"{row['wall_ms']:.1f} ms wall, {row['cpu_ms']:.1f} ms CPU of its thread")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(profile)
        print(out.getvalue())
    payload = {"benchmark": "coordinator", "machine": machine_info(), **row}
    write_json(json_path, payload)
    return payload
