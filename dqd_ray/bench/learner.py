"""The learner's two hot paths: TD3 updates and the critic jacobian.

``dqd-ray bench learner`` measures, on one device and in one run:

- full TD3 updates (twin critics, delayed actors, target soft updates) of
  the stacked ensemble of k+1 agents against k+1 separate one-agent
  ensembles updated one after another on the same batches, as full
  (k+1)-agent updates per second and their ratio;
- with ``--mode``, the ensemble's updates in other update modes
  (``td3.update_mode``: compile, torch.compile of the whole update step;
  cudagraphs, CUDA graphs, a GPU only) beside eager, and the one-off time
  each takes to set up;
- the jacobian of every objective's mean Q1 for 1 and 8 genomes over 256,
  4,096 and 65,536 states, with the current method (one backward pass
  through the critics to the actions, then batched policy VJPs) and the
  previous one (one batched backward pass through the critics per objective),
  side by side (the previous one only up to 65,536 genome-state pairs: past
  that it needs gigabytes);
- with several ``--threads``, all of it at each torch thread count, the
  counts interleaved in every repeat (the same machine load), and the
  speed-up of each over the fewest threads.

The JSON's ``updates`` and ``jacobian`` hold the thread count with the most
single-agent updates per second (what ``bench iteration --learner-json``
reads); ``by_threads`` holds every count's.

Sizes are QD Ant's (28 observations, 8 actions, 4 measures, policy
128x128, critics 256x256) unless another env is named.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from dqd_ray.bench.common import machine_info, print_table, write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(rng: np.random.Generator, n: int, b: int, obs: int, act: int,
             rew: int) -> dict[str, np.ndarray]:
    return {
        "obs": rng.normal(size=(n, b, obs)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(n, b, act)).astype(np.float32),
        "reward": rng.normal(size=(n, b, rew)).astype(np.float32),
        "next_obs": rng.normal(size=(n, b, obs)).astype(np.float32),
        "terminated": (rng.random(size=(n, b)) < 0.01).astype(np.float32),
    }


def jacobian_vmapped(ens, genomes: np.ndarray, states: np.ndarray) -> np.ndarray:
    """The previous jacobian: one batched backward pass through every critic
    per objective (``is_grads_batched`` over an identity), all states at once.
    Kept here as the comparison point."""
    genomes = ens.spec.check(genomes)
    g_count, e = genomes.shape[0], ens.num_agents
    theta = ens._to(genomes).requires_grad_(True)
    s = ens._to(states)
    act = ens.spec.forward_torch(theta, s)
    n_s = s.shape[0]
    obs_e = s.unsqueeze(0).unsqueeze(0).expand(e, g_count, n_s, s.shape[-1])
    act_e = act.unsqueeze(0).expand(e, g_count, n_s, act.shape[-1])
    x = torch.cat([obs_e, act_e], dim=-1).reshape(e, g_count * n_s, -1)
    q1 = ens.critic(x, select=slice(0, 2 * e, 2)).reshape(e, g_count, n_s)
    per_obj = q1.mean(dim=2).sum(dim=1)
    eye = torch.eye(e, device=ens.device)
    (grads,) = torch.autograd.grad(per_obj, theta, grad_outputs=eye, is_grads_batched=True)
    return grads.permute(1, 0, 2).detach().cpu().double().numpy()


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


MODES = ("eager", "compile", "cudagraphs")


def thread_counts(threads) -> list[int]:
    """The torch thread counts to measure, ascending, once each (0 or None:
    torch's current setting)."""
    if threads is None or isinstance(threads, int):
        threads = [threads]
    default = torch.get_num_threads()
    return sorted({int(t) if t else default for t in threads})


def run(device: str = "cpu", env_id: str = "QDAntBulletEnv-v0", batch_size: int = 256,
        updates: int = 100, repeats: int = 3, genomes: tuple[int, ...] = (1, 8),
        states: tuple[int, ...] = (256, 4096, 65536), threads=(1,),
        modes: tuple[str, ...] = ("eager",), compare_previous: bool = True,
        compile_step: bool = False, json_path: str | None = None) -> dict[str, Any]:
    """Runs the bench; prints two tables and returns (and optionally writes) the figures.

    ``threads``: torch thread counts (an int or a list; 0: torch's setting).
    ``modes``: the update modes (``td3.update_mode``) to time the ensemble in
    (eager always runs: it is the reference); ``compile_step`` adds compile.
    """
    from dqd_ray.config import PolicyConfig, TD3Config
    from dqd_ray.envs import env_metadata
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.roles.td3 import TD3Ensemble

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here; use --device cpu")
    counts = thread_counts(threads)
    base = counts[0]  # speed-ups are against the fewest threads (1 if asked for)
    modes = list(dict.fromkeys(["eager", *modes, *(["compile"] if compile_step else [])]))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown --mode {unknown}: choose from {list(MODES)}")
    skipped = {}
    if "cudagraphs" in modes and device != "cuda":
        skipped["cudagraphs"] = "needs a GPU: CUDA graphs capture CUDA kernels (--device cuda)"
        print(f"--mode cudagraphs: skipped on {device}: it needs a GPU (CUDA graphs capture "
              "CUDA kernels); run it with --device cuda on a machine with one", flush=True)
        modes.remove("cudagraphs")
    extra = [m for m in modes if m != "eager"]
    threads_before = torch.get_num_threads()
    dev = torch.device(device)
    meta = env_metadata(env_id)
    spec = PolicySpec.from_config(env_id, PolicyConfig())
    cfg = TD3Config(batch_size=batch_size)
    k1 = 1 + meta.measure_dim
    rng = np.random.default_rng(0)
    batches = _batches(rng, updates, batch_size, meta.obs_dim, meta.act_dim, k1)
    one = {k: v[:1] for k, v in batches.items()}
    two = {k: v[:2] for k, v in batches.items()}

    ens = TD3Ensemble(spec, k1, cfg, device=device, seed=0)
    agents = [TD3Ensemble(spec, k1, cfg, device=device, seed=0, objectives=[j])
              for j in range(k1)]
    others = {m: TD3Ensemble(spec, k1, cfg.model_copy(update={"update_mode": m}),
                             device=device, seed=0) for m in extra}

    def train_ensemble():
        ens.train(batches)

    def train_sequential():
        for i in range(updates):
            b = {k: v[i] for k, v in batches.items()}
            for agent in agents:
                agent.train_step(b)

    setup_s = {}
    try:
        for t in counts:  # warm-up (allocations, lazy init; compiling, capturing)
            torch.set_num_threads(t)
            ens.train(one)
            for agent in agents:
                agent.train(one)
            for m, other in others.items():
                t0 = time.perf_counter()
                other.train(two)  # both update kinds: with and without the actor step
                _sync(dev)
                setup_s.setdefault(m, time.perf_counter() - t0)

        # Interleaved repeats: every thread count and mode sees the same machine load.
        t_ens = {t: [] for t in counts}
        t_seq = {t: [] for t in counts}
        t_mode = {m: {t: [] for t in counts} for m in extra}
        for _ in range(repeats):
            for t in counts:
                torch.set_num_threads(t)
                t_ens[t] += _time(train_ensemble, dev, 1)
                t_seq[t] += _time(train_sequential, dev, 1)
                for m, other in others.items():
                    t_mode[m][t] += _time(lambda other=other: other.train(batches), dev, 1)
        update_rows = {}
        for t in counts:
            ens_rate = updates / statistics.median(t_ens[t])
            seq_rate = updates / statistics.median(t_seq[t])
            row = {"threads": t, "device": device, "agents": k1, "batch": batch_size,
                   "ensemble_updates_per_s": ens_rate, "sequential_updates_per_s": seq_rate,
                   "ratio": ens_rate / seq_rate, "single_agent_updates_per_s": seq_rate * k1}
            for m in extra:
                rate = updates / statistics.median(t_mode[m][t])
                row.update({f"{m}_updates_per_s": rate, f"{m}_vs_eager": rate / ens_rate,
                            f"{m}_setup_s": setup_s[m]})
            update_rows[t] = row
        for row in update_rows.values():
            ref = update_rows[base]
            row["ensemble_thread_speedup"] = (row["ensemble_updates_per_s"]
                                              / ref["ensemble_updates_per_s"])
            row["single_agent_thread_speedup"] = (row["single_agent_updates_per_s"]
                                                  / ref["single_agent_updates_per_s"])
        print(f"TD3 updates ({k1} agents, batch {batch_size}, {updates} updates, "
              f"median of {repeats}, torch threads {counts}, speed-ups against {base}):")
        cols = ["threads", "device", "ensemble_updates_per_s", "sequential_updates_per_s",
                "ratio", "single_agent_updates_per_s", "ensemble_thread_speedup",
                "single_agent_thread_speedup"]
        for m in extra:
            cols += [f"{m}_updates_per_s", f"{m}_vs_eager", f"{m}_setup_s"]
        print_table(list(update_rows.values()), cols)

        jac_rows = {t: [] for t in counts}
        genome_rng = np.random.default_rng(1)
        for g in genomes:
            thetas = np.stack([spec.init_genome(genome_rng) for _ in range(g)])
            for n in states:
                s = rng.normal(size=(n, meta.obs_dim)).astype(np.float32)
                ens.jacobian(thetas[:1], s[:8])  # warm-up
                # The previous method holds every state's activations for all
                # objectives at once: gigabytes past 65,536 genome-state pairs.
                previous = compare_previous and g * n <= 65536
                now = {t: [] for t in counts}
                prev = {t: [] for t in counts}
                for _ in range(repeats):
                    for t in counts:
                        torch.set_num_threads(t)
                        now[t] += _time(lambda thetas=thetas, s=s: ens.jacobian(thetas, s),
                                        dev, 1)
                        if previous:
                            prev[t] += _time(lambda thetas=thetas, s=s:
                                             jacobian_vmapped(ens, thetas, s), dev, 1)
                diff = None
                if previous:
                    a, b = ens.jacobian(thetas, s), jacobian_vmapped(ens, thetas, s)
                    diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                for t in counts:
                    row: dict[str, Any] = {"threads": t, "genomes": g, "states": n,
                                           "jacobian_s": statistics.median(now[t])}
                    row["jacobian_thread_speedup"] = (statistics.median(now[base])
                                                      / row["jacobian_s"])
                    if previous:
                        row["previous_s"] = statistics.median(prev[t])
                        row["speedup"] = row["previous_s"] / row["jacobian_s"]
                        row["max_rel_diff"] = diff
                    jac_rows[t].append(row)
                    print(f"  jacobian G={g} S={n}, {t} thread(s): {row['jacobian_s']:.4f} s"
                          + (f" (previous {row['previous_s']:.4f} s, x{row['speedup']:.2f})"
                             if previous else ""), flush=True)
    finally:
        torch.set_num_threads(threads_before)
    print(f"Jacobian of {k1} objectives (median of {repeats}):")
    cols = ["threads", "genomes", "states", "jacobian_s", "jacobian_thread_speedup"]
    if compare_previous:
        cols += ["previous_s", "speedup", "max_rel_diff"]
    print_table([r for t in counts for r in jac_rows[t]], cols)
    best = max(counts, key=lambda t: update_rows[t]["single_agent_updates_per_s"])
    if len(counts) > 1:
        print(f"most single-agent updates/s at {best} thread(s): updates and jacobian of "
              "the JSON are its figures; by_threads has every count's")
    payload = {"machine": machine_info(), "env": env_id, "torch": torch.__version__,
               "torch_threads": best, "threads": counts, "thread_speedup_base": base,
               "modes": modes, "skipped_modes": skipped,
               "updates": update_rows[best], "jacobian": jac_rows[best],
               "by_threads": [{"threads": t, "updates": update_rows[t], "jacobian": jac_rows[t]}
                              for t in counts],
               "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None}
    write_json(json_path, payload)
    return payload
