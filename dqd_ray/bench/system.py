"""``dqd-ray bench system``: rollout throughput of the actor graph.

Side by side in one run, on the same genomes and seeds:

(a) one process stepping ``envs_per_worker`` environments with the same
    batched policy forward (no Ray, transitions dropped);
(b) N rollout actors on Ray evaluating through the load-balancing evaluator
    while streaming every transition to the replay actor, first with the
    learner idle, then with the learner training in the background.

Efficiency = (b) / (N x a). Then a few real CMA-MEGA (TD3) iterations on the
graph measure the share of time the rollout workers sit idle waiting for the
coordinator or the learner.
"""

from __future__ import annotations

import time

import numpy as np

from dqd_ray.bench.common import machine_info, print_table, write_json


def _genomes(spec, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([spec.init_genome(rng) for _ in range(n)])


def run(workers: int | None = None, env_id: str = "QDAntBulletEnv-v0", genomes: int = 24,
        envs_per_worker: int = 4, episode_length: int = 1000, iterations: int = 5,
        json_path: str | None = None, seed: int = 0) -> dict:
    import ray

    from dqd_ray.config import build_config
    from dqd_ray.loop import init_ray
    from dqd_ray.roles.rollout import RolloutWorker
    from dqd_ray.runtime import System

    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = workers or max(1, cpus - 1)
    sets = [f"env.id={env_id}", f"env.episode_length={episode_length}",
            f"resources.num_rollout_workers={n}", f"resources.envs_per_worker={envs_per_worker}",
            "td3.replay_capacity=200000", "logging.progress_bar=false"]
    cfg = build_config("cma_mega_td3", sets=sets)
    from dqd_ray.roles.policy import PolicySpec

    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    pop = _genomes(spec, genomes, seed)
    seeds = np.arange(genomes) + 1000

    # (a) one process, same forward, same genomes.
    local = RolloutWorker(env_id, spec, num_envs=envs_per_worker, episode_length=episode_length)
    t = time.perf_counter()
    out_a = local.evaluate(pop, seeds, record=False)
    single_sps = out_a["env_steps"] / (time.perf_counter() - t)
    local.close()

    system = System(cfg, "ray")
    ev = system.evaluator
    ev.evaluate(pop[:n], seeds[:n])  # warm up actors and imports

    def timed() -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = ev.evaluate(pop, seeds)
        return out["env_steps"] / (time.perf_counter() - t0), out

    idle_sps, out_b = timed()
    assert np.allclose(out_b["fitness"], out_a["fitness"]), "actors and process disagree"
    system.start()  # learners train in the background from here on
    time.sleep(2.0)
    before = system.group.stats()["updates"]
    t0 = time.perf_counter()
    train_sps, _ = timed()
    updates_per_s = (system.group.stats()["updates"] - before) / (time.perf_counter() - t0)

    # Real iterations: share of time the workers wait.
    stats0 = system.system_stats()
    t0 = time.perf_counter()
    for _ in range(iterations):
        system.iteration()
    wall = time.perf_counter() - t0
    stats1 = system.system_stats()
    busy = stats1["worker_busy_s"] - stats0["worker_busy_s"]
    idle_frac = max(0.0, 1.0 - busy / (n * wall))
    system.close()

    rows = [
        {"setup": "(a) single process", "workers": 1, "env_steps_per_s": single_sps,
         "efficiency": 1.0},
        {"setup": "(b) Ray, learner idle", "workers": n, "env_steps_per_s": idle_sps,
         "efficiency": idle_sps / (n * single_sps)},
        {"setup": "(b) Ray, learner training", "workers": n, "env_steps_per_s": train_sps,
         "efficiency": train_sps / (n * single_sps)},
    ]
    print_table(rows, ["setup", "workers", "env_steps_per_s", "efficiency"])
    print(f"learner updates/s while rollouts ran: {updates_per_s:.1f}")
    print(f"worker idle share over {iterations} CMA-MEGA (TD3) iterations: {100 * idle_frac:.1f}%")
    print(f"goals: efficiency >= 0.85 with the learner idle: "
          f"{'met' if rows[1]['efficiency'] >= 0.85 else 'NOT met'}; "
          f"idle share < 10%: {'met' if idle_frac < 0.10 else 'NOT met'}")
    payload = {"benchmark": "system", "machine": machine_info(), "env": env_id,
               "genomes": genomes, "envs_per_worker": envs_per_worker,
               "episode_length": episode_length, "cluster_cpus": cpus, "results": rows,
               "learner_updates_per_s": updates_per_s, "worker_idle_frac": idle_frac,
               "iterations": iterations}
    write_json(json_path, payload)
    return payload
