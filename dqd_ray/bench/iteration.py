"""``dqd-ray bench iteration``: a few iterations at the paper's settings, timed by
phase, and the projected wall time of a whole paper run.

The run is the preset as configured (CMA-MEGA (TD3, ES): 200 evaluations, 600
critic updates staged from the experience up to the previous iteration and run
while the branches are evaluated, a 65,536-state jacobian) on this machine's
Ray. Each iteration is split into: theta's ES samples, the jacobian, theta
with its branches (and the greedy actor), the wait for critic training after the
branches, robustness, the coordinator's own work (ask/tell, CMA-ES, ES
estimate) and, once, a checkpoint. The critic updates start when staged, at the
start of the iteration, and run through both halves (the learners answer the
jacobian from the networks as staged): ``overlap`` is the share of their
training time hidden, ``hidden_half_1`` and ``hidden_half_2`` the shares hidden
behind each half.

The projection, printed with its inputs::

    T = I * (ceil(H1 / W) * t_ep + t_jac + ceil(H2 / W) * t_ep
             + max(0, t_train - (ceil(H1 / W) + ceil(H2 / W)) * t_ep - t_jac)
             + ceil(R / W) * t_ep + t_coord + t_ckpt / C)

I iterations (evaluations / per-iteration evaluations), H1 and H2 the two
halves of the batch (the ES samples; theta, the branches and the greedy
actor), W rollout
CPUs, R robustness episodes per iteration, t_ep the time of one episode on one
core (``episode_steps`` / the env steps per second of the rollout workers'
own CPU time, measured inside these iterations: what a core of their own gives,
whatever shared this machine's cores; the rate per worker over the rollout
phases' wall time is printed too), t_jac and
t_train the learner's jacobian and critic-update times (measured here, or taken
from a ``dqd-ray bench learner --json`` file, e.g. one made on a GPU), t_coord
the coordinator's measured time, t_ckpt / C the checkpoint cost per iteration
(its capture: the roles' copies are gathered and written in the background).
``--assume-updates-per-s`` and ``--assume-jacobian-s`` replace the learner's
figures with assumed ones (a what-if, labelled as such in the output).
``episode_steps`` is 1000 (the cap: every episode runs to the time limit) unless
given; the measured mean is printed next to it.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dqd_ray import algorithms
from dqd_ray.bench.common import machine_info, print_table, write_json

PUBLISHED = {"hours": 16.3, "cpus": 100, "gpu": "P100",
             "what": "CMA-MEGA (TD3, ES) on QD Ant, 1,000,000 evaluations (Tjanaka et al. 2022)"}


def _learner_figures(path: str | None, updates: int, states: int) -> dict | None:
    """(t_train, t_jac) for ``updates`` fitness-critic updates and a ``states``-state
    jacobian of one genome, from a ``bench learner`` JSON file."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    u = data["updates"]
    # The paper trains the fitness critic only: one agent of the k+1.
    single = u["single_agent_updates_per_s"]
    rows = [r for r in data["jacobian"] if r["genomes"] == 1]
    row = min(rows, key=lambda r: abs(r["states"] - states))
    # The bench's jacobian covers all k+1 objectives; one objective costs less,
    # so this over-estimates.
    return {"t_train": updates / single, "t_jac": row["jacobian_s"] * states / row["states"],
            "source": f"{path} ({data.get('cuda_device') or u['device']})"}


def run(preset: str = "cma_mega_td3_es", env_id: str = "QDAntBulletEnv-v0",
        iterations: int = 4, sets: list[str] | None = None, workers: tuple[int, ...] = (100,),
        episode_steps: int = 1000, learner_json: str | None = None,
        assume_updates_per_s: float | None = None, assume_jacobian_s: float | None = None,
        json_path: str | None = None) -> dict[str, Any]:
    import ray

    from dqd_ray.config import build_config
    from dqd_ray.loop import init_ray
    from dqd_ray.runtime import System, evaluations_per_iteration
    from dqd_ray.state.writer import CheckpointWriter

    cfg = build_config(preset, sets=[f"env.id={env_id}", "logging.progress_bar=false",
                                     *(sets or [])])
    init_ray()
    system = System(cfg, "ray")
    rows = []
    try:
        before = system.system_stats()
        for i in range(iterations):
            m = system.iteration()
            after = system.system_stats()
            # The rollout workers' own CPU seconds: the rate a core of their own
            # gives, whatever else shared this machine's cores.
            m["worker_cpu_s"] = after["worker_cpu_s"] - before["worker_cpu_s"]
            before = after
            rows.append(m)
            coord = max(0.0, m["iteration_s"] - m["phase_theta_es_s"] - m["phase_jacobian_s"]
                        - m["phase_batch_s"] - m["train_s"] - m["phase_robustness_s"])
            print(f"  iteration {i + 1}: {m['iteration_s']:.1f} s ({m['iteration_evaluations']}"
                  f" evaluations, {m['iteration_env_steps']} env steps, "
                  f"{m.get('critic_updates', 0)} critic updates so far)", flush=True)
            m["phase_coordinator_s"] = coord
        # A checkpoint as the loop takes one: the capture (each role keeps a
        # copy of its state) is on the critical path; the roles' copies are
        # gathered and written in the background while the next iteration runs.
        # Side by side, repeated: the state gathered into the driver at once
        # (how checkpoints were captured before), which the capture replaces.
        captures, gathered, records = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            writer = CheckpointWriter(Path(tmp) / "checkpoints", cfg.model_dump(mode="json"))
            for _ in range(3):
                t0 = time.perf_counter()
                system.state(save_replay=cfg.checkpoint.save_replay)
                gathered.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                collect = system.capture(save_replay=cfg.checkpoint.save_replay)
                captures.append(time.perf_counter() - t0)
                writer.submit(iterations, collect, captures[-1])
                records.append(writer.wait())
            writer.close()
        t_ckpt = statistics.median(captures)
        t_write = statistics.median(r["write_s"] for r in records)
        t_collect = statistics.median(r["collect_s"] for r in records)
        t_gathered = statistics.median(gathered)
        ckpt_bytes = records[-1]["bytes"]
        n_workers = len(system.workers)
        cpus = ray.cluster_resources().get("CPU", 0)
    finally:
        system.close()

    # The first iteration has no trained critics and starts the actors; the
    # second pays one-off costs on Ray (first training and jacobian): the
    # projection uses the iterations after them.
    steady = rows[2:] or rows[1:] or rows
    table = []
    prev_updates = 0
    for i, m in enumerate(rows):
        done_updates = int(m.get("critic_updates", 0)) - prev_updates  # the counter is cumulative
        prev_updates = int(m.get("critic_updates", 0))
        train = m.get("critic_train_s")
        # The updates start when staged and run through the first half (theta's
        # ES samples and the jacobian) and the second (theta and its branches).
        h1 = min(train, m["phase_theta_es_s"] + m["phase_jacobian_s"]) if train else 0.0
        h2 = min(train - h1, m["phase_batch_s"]) if train else 0.0
        table.append({
            "iteration": i + 1, "total_s": m["iteration_s"],
            "theta_es_s": m["phase_theta_es_s"], "jacobian_s": m["phase_jacobian_s"],
            "batch_s": m["phase_batch_s"], "train_wait_s": m["train_s"],
            "critic_train_s": train if train is not None else float("nan"),
            "overlap": (1.0 - m["train_s"] / train) if train else float("nan"),
            "hidden_half_1": h1 / train if train else float("nan"),
            "hidden_half_2": h2 / train if train else float("nan"),
            "robustness_s": m["phase_robustness_s"], "stage_s": m.get("phase_stage_s", 0.0),
            "coordinator_s": m["phase_coordinator_s"],
            "evaluations": m["iteration_evaluations"], "env_steps": m["iteration_env_steps"],
            "critic_updates": done_updates,
        })
    from dqd_ray.envs import compiled

    step = "in C" if compiled.status()["compiled"] else "in Python"
    print(f"{preset} on {env_id}, {n_workers} rollout workers on {cpus:g} CPUs, envs stepping "
          f"{step} (seconds per phase):")
    print_table(table, ["iteration", "total_s", "theta_es_s", "jacobian_s", "batch_s",
                        "train_wait_s", "critic_train_s", "overlap", "hidden_half_1",
                        "hidden_half_2", "robustness_s", "stage_s", "coordinator_s",
                        "evaluations", "critic_updates"])
    print("(coordinator_s: everything else, staging the critic batches (stage_s) included; "
          f"the projection uses iterations {len(rows) - len(steady) + 1}-{len(rows)})")
    print(f"checkpoint (medians of 3): capture {1e3 * t_ckpt:.1f} ms on the critical path "
          f"(the state gathered into the driver at once, as before: {1e3 * t_gathered:.0f} ms); "
          f"background write {t_write:.2f} s (of which {t_collect:.2f} s gathering the roles' "
          f"copies), {ckpt_bytes / 1e6:.1f} MB")

    # -- projection ---------------------------------------------------------------
    rollout_s = sum(m["phase_theta_es_s"] + m["phase_batch_s"] + m["phase_robustness_s"]
                    for m in steady)
    steps = sum(m["iteration_env_steps"] for m in steady)
    evals = sum(m["iteration_evaluations"] for m in steady)
    rob_evals = [m.get("robustness_evaluations", 0) for m in rows]
    rob_per_it = (rob_evals[-1] - (rob_evals[0] if len(rows) > 1 else 0)) / len(steady)
    mean_ep = steps / max(evals, 1)
    rob_steps = rob_per_it * mean_ep  # robustness episodes count no env steps: estimated
    sps_wall = (steps + rob_steps) / max(rollout_s, 1e-9) / max(n_workers, 1)
    worker_cpu = sum(m["worker_cpu_s"] for m in steady)
    sps_core = (steps + rob_steps) / worker_cpu if worker_cpu > 0 else sps_wall
    per_it = evaluations_per_iteration(cfg)
    h1 = algorithms.get(cfg.algorithm.name).first_half_evaluations(cfg, cfg.needs())
    h2 = per_it - h1
    total_evals = cfg.evaluations or cfg.iterations * per_it
    n_it = math.ceil(total_evals / per_it)
    updates = cfg.td3.train_steps_per_iteration if cfg.uses_td3 else 0
    measured_train = [m["critic_train_s"] for m in steady if m.get("critic_train_s")]
    inputs = {
        "evaluations": total_evals, "per_iteration": per_it, "iterations": n_it,
        "half_1": h1, "half_2": h2, "robustness_episodes": rob_per_it,
        "episode_steps": episode_steps, "measured_mean_episode_steps": mean_ep,
        "env_steps_per_s_per_core": sps_core,
        "env_steps_per_s_per_worker_wall": sps_wall,
        "t_jac": statistics.median(m["phase_jacobian_s"] for m in steady),
        "t_train": statistics.median(measured_train) if measured_train else 0.0,
        "t_coord": statistics.median(m["phase_coordinator_s"] for m in steady),
        "t_ckpt_per_iteration": t_ckpt / cfg.checkpoint.every,
        "learner_source": f"measured here (CPU, {updates} updates)",
    }
    measured = dict(inputs)
    lf = _learner_figures(learner_json, updates, cfg.td3.jacobian_states)
    if lf:
        inputs.update(t_train=lf["t_train"], t_jac=lf["t_jac"], learner_source=lf["source"])
    if assume_updates_per_s:
        inputs["t_train"] = updates / assume_updates_per_s
        inputs["learner_source"] = f"assumed: {assume_updates_per_s:g} updates/s"
    if assume_jacobian_s is not None:
        inputs["t_jac"] = assume_jacobian_s
        inputs["learner_source"] += f", assumed jacobian {assume_jacobian_s:g} s"
    t_ep = episode_steps / sps_core
    inputs["t_ep"] = measured["t_ep"] = t_ep
    print("projection: T = I * (ceil(H1/W) t_ep + t_jac + ceil(H2/W) t_ep "
          "+ max(0, t_train - that) + ceil(R/W) t_ep + t_coord + t_ckpt/C)")
    for k, v in inputs.items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    projections = _project(inputs, workers, h1, h2, rob_per_it, n_it)
    columns = ["rollout_cpus", "iteration_s", "hours", "train_exposed_s", "hidden_half_1",
               "hidden_half_2", "training_hidden"]
    print_table(projections, columns)
    measured_projections = None
    if measured["learner_source"] != inputs["learner_source"]:
        # The same run with this machine's learner, for comparison.
        measured_projections = _project(measured, workers, h1, h2, rob_per_it, n_it)
        print(f"with the learner measured here (t_train = {measured['t_train']:.4g}, "
              f"t_jac = {measured['t_jac']:.4g}):")
        print_table(measured_projections, columns)
    print(f"published: {PUBLISHED['hours']} h on {PUBLISHED['cpus']} CPUs and a "
          f"{PUBLISHED['gpu']} ({PUBLISHED['what']})")
    payload = {"benchmark": "iteration", "machine": machine_info(), "preset": preset,
               "env": env_id, "rollout_workers": n_workers, "cpus": cpus,
               "iterations": table, "checkpoint_s": t_ckpt, "checkpoint_capture_s": t_ckpt,
               "checkpoint_write_s": t_write, "checkpoint_collect_s": t_collect,
               "checkpoint_gathered_at_once_s": t_gathered,
               "checkpoint_bytes": ckpt_bytes,
               "projection_inputs": inputs, "projection": projections,
               "projection_measured_learner": measured_projections or projections,
               "published": PUBLISHED}
    write_json(json_path, payload)
    return payload


def _project(inputs: dict, workers, h1: int, h2: int, rob_per_it: float,
             n_it: int) -> list[dict]:
    """The projected iteration and run times on each of ``workers`` rollout CPUs."""
    t_ep, t_train, t_jac = inputs["t_ep"], inputs["t_train"], inputs["t_jac"]
    out = []
    for w in workers:
        half1 = math.ceil(h1 / w) * t_ep if h1 else 0.0
        half2 = math.ceil(h2 / w) * t_ep
        rob = math.ceil(rob_per_it / w) * t_ep if rob_per_it else 0.0
        # The updates run from the start of the first half to the end of the
        # second; the jacobian comes from the networks as staged, meanwhile.
        halves = half1 + t_jac + half2
        exposed = max(0.0, t_train - halves)
        per = halves + exposed + rob + inputs["t_coord"] + inputs["t_ckpt_per_iteration"]
        out.append({"rollout_cpus": w, "iteration_s": per, "hours": n_it * per / 3600.0,
                    "train_exposed_s": exposed,
                    "hidden_half_1": min(t_train, half1 + t_jac) / t_train
                    if t_train else float("nan"),
                    "hidden_half_2": min(max(0.0, t_train - half1 - t_jac), half2) / t_train
                    if t_train else float("nan"),
                    "training_hidden": exposed == 0.0})
    return out
