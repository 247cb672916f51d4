"""The learner's two hot paths: TD3 updates and the critic jacobian.

``dqd-ray bench learner`` measures, on one device and in one run:

- full TD3 updates (twin critics, delayed actors, target soft updates) of
  the stacked ensemble of k+1 agents against k+1 separate one-agent
  ensembles updated one after another on the same batches, as full
  (k+1)-agent updates per second and their ratio;
- the jacobian of every objective's mean Q1 for 1 and 8 genomes over 256,
  4,096 and 65,536 states, with the current method (one backward pass
  through the critics to the actions, then batched policy VJPs) and the
  previous one (one batched backward pass through the critics per objective),
  side by side (the previous one only up to 65,536 genome-state pairs: past
  that it needs gigabytes).

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


def run(device: str = "cpu", env_id: str = "QDAntBulletEnv-v0", batch_size: int = 256,
        updates: int = 100, repeats: int = 3, genomes: tuple[int, ...] = (1, 8),
        states: tuple[int, ...] = (256, 4096, 65536), threads: int | None = 1,
        compare_previous: bool = True, compile_step: bool = False,
        json_path: str | None = None) -> dict[str, Any]:
    """Runs the bench; prints two tables and returns (and optionally writes) the figures."""
    from dqd_ray.config import PolicyConfig, TD3Config
    from dqd_ray.envs import env_metadata
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.roles.td3 import TD3Ensemble

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here; use --device cpu")
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    meta = env_metadata(env_id)
    spec = PolicySpec.from_config(env_id, PolicyConfig())
    cfg = TD3Config(batch_size=batch_size)
    k1 = 1 + meta.measure_dim
    rng = np.random.default_rng(0)
    batches = _batches(rng, updates, batch_size, meta.obs_dim, meta.act_dim, k1)
    one = {k: v[:1] for k, v in batches.items()}

    ens = TD3Ensemble(spec, k1, cfg, device=device, seed=0)
    agents = [TD3Ensemble(spec, k1, cfg, device=device, seed=0, objectives=[j])
              for j in range(k1)]

    def train_ensemble():
        ens.train(batches)

    def train_sequential():
        for i in range(updates):
            b = {k: v[i] for k, v in batches.items()}
            for agent in agents:
                agent.train_step(b)

    ens.train(one)  # warm-up (allocations, lazy init)
    for agent in agents:
        agent.train(one)
    compiled = None
    if compile_step:  # the same ensemble with torch.compile'd losses
        compiled = TD3Ensemble(spec, k1, cfg.model_copy(update={"compile": True}),
                               device=device, seed=0)
        t0 = time.perf_counter()
        compiled.train({k: v[:2] for k, v in batches.items()})  # compiles both losses
        compile_s = time.perf_counter() - t0

    # Interleaved repeats: all see the same machine load.
    t_ens, t_seq, t_cmp = [], [], []
    for _ in range(repeats):
        t_ens += _time(train_ensemble, dev, 1)
        t_seq += _time(train_sequential, dev, 1)
        if compiled is not None:
            t_cmp += _time(lambda: compiled.train(batches), dev, 1)
    ens_rate = updates / statistics.median(t_ens)
    seq_rate = updates / statistics.median(t_seq)
    updates_row = {
        "device": device, "agents": k1, "batch": batch_size,
        "ensemble_updates_per_s": ens_rate, "sequential_updates_per_s": seq_rate,
        "ratio": ens_rate / seq_rate, "single_agent_updates_per_s": seq_rate * k1,
    }
    if compiled is not None:
        updates_row["compiled_updates_per_s"] = updates / statistics.median(t_cmp)
        updates_row["compiled_vs_eager"] = updates_row["compiled_updates_per_s"] / ens_rate
        updates_row["compile_s"] = compile_s
    print(f"TD3 updates ({k1} agents, batch {batch_size}, {updates} updates, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}):")
    print_table([updates_row], ["device", "agents", "batch", "ensemble_updates_per_s",
                                "sequential_updates_per_s", "ratio",
                                "single_agent_updates_per_s"]
                + (["compiled_updates_per_s", "compiled_vs_eager", "compile_s"]
                   if compiled is not None else []))

    jac_rows = []
    genome_rng = np.random.default_rng(1)
    for g in genomes:
        thetas = np.stack([spec.init_genome(genome_rng) for _ in range(g)])
        for n in states:
            s = rng.normal(size=(n, meta.obs_dim)).astype(np.float32)
            ens.jacobian(thetas[:1], s[:8])  # warm-up
            row: dict[str, Any] = {"genomes": g, "states": n}
            now = _time(lambda thetas=thetas, s=s: ens.jacobian(thetas, s), dev, repeats)
            row["jacobian_s"] = statistics.median(now)
            # The previous method holds every state's activations for all
            # objectives at once: gigabytes past 65,536 genome-state pairs.
            if compare_previous and g * n <= 65536:
                prev = _time(lambda thetas=thetas, s=s: jacobian_vmapped(ens, thetas, s), dev,
                             repeats)
                row["previous_s"] = statistics.median(prev)
                row["speedup"] = row["previous_s"] / row["jacobian_s"]
                a, b = ens.jacobian(thetas, s), jacobian_vmapped(ens, thetas, s)
                row["max_rel_diff"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
            jac_rows.append(row)
            print(f"  jacobian G={g} S={n}: {row['jacobian_s']:.4f} s"
                  + (f" (previous {row['previous_s']:.4f} s, x{row['speedup']:.2f})"
                     if "previous_s" in row else ""), flush=True)
    print(f"Jacobian of {k1} objectives (median of {repeats}):")
    cols = ["genomes", "states", "jacobian_s"]
    if compare_previous:
        cols += ["previous_s", "speedup", "max_rel_diff"]
    print_table(jac_rows, cols)
    payload = {"machine": machine_info(), "env": env_id, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "updates": updates_row,
               "jacobian": jac_rows,
               "cuda_device": torch.cuda.get_device_name(0) if device == "cuda" else None}
    write_json(json_path, payload)
    return payload
