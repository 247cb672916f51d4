"""RolloutWorker: evaluates policy genomes on several environments in lockstep.

Each genome gets one episode. The worker keeps ``num_envs`` environments busy:
when an episode ends the env takes the next genome in the queue, and every step
runs one batched forward over all active (env, genome) pairs. Transitions go to
a sink in chunks (the replay buffer, or Ray's replay actor) and never through
the caller. A non-finite action or observation stops that genome's episode and
flags it invalid; its transitions after the fault are not recorded.

Two options serve evolution strategies (ME-ES): Gaussian action noise (seeded
from each genome's seed, clipped to the action bounds) and the observation
sums of chosen episodes, from which the caller keeps running observation
statistics.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Callable

import numpy as np

from dqd_ray.envs import env_metadata, make_env
from dqd_ray.roles.policy import PolicySpec

Sink = Callable[..., None]  # sink(chunk) or sink(chunk, key=...)


class _ChunkBuilder:
    def __init__(self, obs_dim: int, act_dim: int, reward_dim: int, size: int, sink: Sink,
                 key: tuple | None = None):
        self.size, self.sink, self.key, self.part = size, sink, key, 0
        self._bufs = {
            "obs": np.empty((size, obs_dim), np.float32),
            "action": np.empty((size, act_dim), np.float32),
            "reward": np.empty((size, reward_dim), np.float32),
            "next_obs": np.empty((size, obs_dim), np.float32),
            "terminated": np.empty((size,), np.float32),
        }
        self.n = 0

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.n
        b = self._bufs
        b["obs"][i], b["action"][i], b["reward"][i] = obs, action, reward
        b["next_obs"][i], b["terminated"][i] = next_obs, terminated
        self.n += 1
        if self.n == self.size:
            self.flush()

    def add_step(self, obs, action, reward: float, measures_step, next_obs, terminated: float):
        """:meth:`add` with the reward vector given as fitness reward and step measures."""
        i = self.n
        b = self._bufs
        b["obs"][i] = obs
        b["action"][i] = action
        row = b["reward"][i]
        row[0] = reward
        row[1:] = measures_step
        b["next_obs"][i] = next_obs
        b["terminated"][i] = terminated
        self.n += 1
        if self.n == self.size:
            self.flush()

    def flush(self):
        if self.n:
            chunk = {k: v[: self.n].copy() for k, v in self._bufs.items()}
            if self.key is None:
                self.sink(chunk)
            else:
                self.sink(chunk, key=(*self.key, self.part))
                self.part += 1
            self.n = 0


class _SlotPolicies:
    """The policy of each env slot, unflattened once per episode into stacked
    layer arrays, so a step's batched forward copies no genome. Each slot's
    matmul is the one :meth:`PolicySpec.forward_many_np` does (same shapes and
    strides per slice): the actions are bit for bit the same."""

    def __init__(self, spec: PolicySpec, slots: int):
        self.spec = spec
        self.w = [np.zeros((slots, fo, fi), np.float32) for _, _, fi, fo in spec.layers]
        self.b = [np.zeros((slots, 1, fo), np.float32) for _, _, fi, fo in spec.layers]
        self.wt = [w.transpose(0, 2, 1) for w in self.w]
        self.hidden_tanh = spec.activation == "tanh"

    def set(self, slot: int, genome: np.ndarray) -> None:
        for (w, b, fi, fo), W, B in zip(self.spec.layers, self.w, self.b):
            W[slot] = genome[w].reshape(fo, fi)
            B[slot, 0] = genome[b]

    def forward(self, obs: np.ndarray, rows: list[int] | None) -> np.ndarray:
        """Actions ``(len(rows), act)`` of the slots ``rows`` (None: all) at ``obs``."""
        x = obs[:, None, :]
        last = len(self.w) - 1
        for i, (W, Wt, B) in enumerate(zip(self.w, self.wt, self.b)):
            if rows is None:
                x = np.matmul(x, Wt) + B
            else:
                x = np.matmul(x, W[rows].transpose(0, 2, 1)) + B[rows]
            if i == last or self.hidden_tanh:
                np.tanh(x, out=x)
            else:
                np.maximum(x, 0.0, out=x)
        return x[:, 0]


class RolloutWorker:
    """Owns ``num_envs`` environments of one id and evaluates genomes.

    Args:
        env_id: QD environment id.
        policy_spec: Shape of the policies (or hidden sizes via ``hidden_sizes``).
        num_envs: Environments stepped in lockstep.
        episode_length: Truncation limit.
        chunk_size: Transitions per chunk handed to the sink.
        sink: Called with each chunk; chunks are returned by ``evaluate`` if None.
        hidden_sizes: Used when ``policy_spec`` is None.
        activation: Used when ``policy_spec`` is None.
        time_limit_done: Record episodes cut by the time limit as done (the
            paper's choice). Default False: the TD target bootstraps through a
            truncation, the correct target for a time limit that is not part
            of the state.
    """

    def __init__(self, env_id: str, policy_spec: PolicySpec | None = None, *, num_envs: int = 1,
                 episode_length: int = 1000, chunk_size: int = 1000, sink: Sink | None = None,
                 hidden_sizes=(128, 128), activation: str = "tanh",
                 time_limit_done: bool = False):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor
        meta = env_metadata(env_id)
        self.env_id = env_id
        self.spec = policy_spec or PolicySpec(meta.obs_dim, meta.act_dim, hidden_sizes, activation)
        self.envs = [make_env(env_id, max_episode_steps=episode_length) for _ in range(num_envs)]
        for env in self.envs:
            env.load()  # while the worker starts, not in its first evaluation
        self.measure_dim = meta.measure_dim
        self.chunk_size = chunk_size
        self.time_limit_done = bool(time_limit_done)
        self._sink = sink
        self.total_env_steps = 0
        self.busy_s = 0.0
        self.cpu_s = 0.0  # CPU time of this process inside evaluate (busy_s less waits)

    def set_sink(self, sink: Sink | None) -> None:
        self._sink = sink

    def evaluate_indices(self, genomes: np.ndarray, indices, seeds, keys=None,
                         record: bool = True, options: dict | None = None) -> dict:
        """Evaluates ``genomes[indices]`` (lets callers share one genome array)."""
        idx = np.asarray(indices)
        return self.evaluate(np.asarray(genomes)[idx], seeds, record=record, keys=keys,
                             **(options or {}))

    def stats(self) -> dict:
        return {"env_steps": self.total_env_steps, "busy_s": self.busy_s,
                "cpu_s": self.cpu_s, "incarnation": self.incarnation,
                "compiled": all(getattr(e, "compiled", False) for e in self.envs)}

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray | list[int],
                 record: bool = True, keys=None, action_noise: float = 0.0,
                 collect_obs=None) -> dict:
        """Runs one episode per genome.

        Args:
            genomes: ``(G, genome_dim)``.
            seeds: One env seed per genome.
            record: Whether to emit transitions.
            keys: Optional ordering key per genome (tuples or ints). When given,
                every chunk holds one genome's transitions and is sent with key
                ``(*key, part)``, so a keyed replay buffer orders them the same
                whichever worker ran which genome.
            action_noise: Std of Gaussian noise added to every action (then
                clipped to [-1, 1]); drawn from a generator seeded by the
                genome's seed, so an evaluation repeats exactly.
            collect_obs: Optional ``(G,)`` bools: the episodes whose observations
                (the first and every next one) are summed into ``obs_sum``,
                ``obs_sumsq`` and ``obs_count``.

        Returns:
            dict with ``fitness (G,)``, ``measures (G, k)``, ``length (G,)``,
            ``valid (G,)`` (bool), ``env_steps``, and ``transitions`` (a list of
            chunks; empty when a sink took them); with ``collect_obs`` also
            ``obs_sum (G, obs)``, ``obs_sumsq (G, obs)`` and ``obs_count (G,)``.
        """
        t_start, cpu_start = time.perf_counter(), time.process_time()
        genomes = np.asarray(self.spec.check(genomes), np.float32)
        if genomes.ndim != 2:
            raise ValueError(f"genomes must be 2-D (G, D), got shape {genomes.shape}")
        seeds = np.asarray(seeds)
        if seeds.shape != (len(genomes),):
            raise ValueError(f"need one seed per genome: {len(genomes)} genomes, "
                             f"seeds {seeds.shape}")
        g_count = len(genomes)
        if action_noise < 0 or not math.isfinite(action_noise):
            raise ValueError(f"action_noise must be a finite std >= 0, got {action_noise}")
        collect = None if collect_obs is None else np.asarray(collect_obs, bool)
        if collect is not None and collect.shape != (g_count,):
            raise ValueError(f"collect_obs needs one flag per genome: {g_count} genomes, "
                             f"got shape {collect.shape}")
        fitness = np.zeros(g_count)
        measures = np.zeros((g_count, self.measure_dim))
        length = np.zeros(g_count, np.int64)
        valid = np.ones(g_count, bool)
        returned: list[dict] = []
        # Without a sink, chunks are returned (keyed builders call sink(chunk, key=...)).
        sink = self._sink if self._sink is not None else (
            lambda chunk, key=None: returned.append(chunk))
        e = self.envs[0]
        dims = (e.observation_space.shape[0], e.action_space.shape[0], 1 + self.measure_dim)
        shared = None
        builders: list[_ChunkBuilder | None] = [None] * len(self.envs)
        if record and keys is None:
            shared = _ChunkBuilder(*dims, self.chunk_size, sink)

        queue = list(range(g_count))
        n_envs = len(self.envs)
        slots: list[int | None] = [None] * n_envs
        obs = np.zeros((n_envs, dims[0]), np.float32)
        policies = _SlotPolicies(self.spec, n_envs)
        envs = self.envs
        steps = 0
        noise_rngs: list = [None] * n_envs
        if collect is not None:
            obs_sum = np.zeros((g_count, dims[0]))
            obs_sumsq = np.zeros((g_count, dims[0]))
            obs_count = np.zeros(g_count, np.int64)

        def observe(gi: int, o: np.ndarray) -> None:
            if collect is not None and collect[gi]:
                obs_sum[gi] += o
                obs_sumsq[gi] += np.square(o, dtype=np.float64)
                obs_count[gi] += 1

        def start(slot: int) -> None:
            if builders[slot] is not None and builders[slot] is not shared:
                builders[slot].flush()  # a keyed chunk holds one episode
            if queue:
                gi = queue.pop(0)
                slots[slot] = gi
                obs[slot], _ = envs[slot].reset(seed=int(seeds[gi]))
                observe(gi, obs[slot])
                policies.set(slot, genomes[gi])
                if action_noise > 0:
                    noise_rngs[slot] = np.random.default_rng((int(seeds[gi]), 0xAC7))
                if record and keys is not None:
                    k = keys[gi]
                    k = tuple(int(v) for v in k) if np.ndim(k) else (int(k),)
                    builders[slot] = _ChunkBuilder(*dims, self.chunk_size, sink, key=k)
                else:
                    builders[slot] = shared
            else:
                slots[slot] = None
                builders[slot] = None

        def stop(slot: int, gi: int, env) -> None:
            valid[gi] = False
            length[gi] = env._t
            start(slot)

        for s in range(n_envs):
            start(s)
        tld = self.time_limit_done
        active = [s for s in range(n_envs) if slots[s] is not None]
        while active:
            full = len(active) == n_envs
            batch_obs = obs if full else obs[active]
            actions = policies.forward(batch_obs, None if full else active)
            finite = np.isfinite(actions).all(axis=1) & np.isfinite(batch_obs).all(axis=1)
            act64 = actions.astype(np.float64)
            if action_noise > 0:
                for row, s in enumerate(active):
                    act64[row] += action_noise * noise_rngs[s].standard_normal(act64.shape[1])
                np.clip(act64, -1.0, 1.0, out=act64)
                actions = act64.astype(np.float32)
            for row, s in enumerate(active):
                gi = slots[s]
                env = envs[s]
                if not finite[row]:
                    stop(s, gi, env)
                    continue
                # tanh actions are within [-1, 1]: env.step's clip changes nothing.
                nxt, rew, term, trunc, step_measures = env.advance(act64[row])
                steps += 1
                if not (env.obs_finite and math.isfinite(rew)):
                    stop(s, gi, env)
                    continue
                b = builders[s]
                if b is not None:
                    b.add_step(obs[s], actions[row], rew, step_measures, nxt,
                               1.0 if (term or (trunc and tld)) else 0.0)
                obs[s] = nxt
                observe(gi, obs[s])
                if term or trunc:
                    fitness[gi] = env.episode_return
                    measures[gi] = env.measures()
                    length[gi] = env._t
                    start(s)
            active = [s for s in range(n_envs) if slots[s] is not None]
        if shared is not None:
            shared.flush()
        drain = getattr(self._sink, "drain", None)
        if drain is not None:
            drain()  # every chunk has reached the buffer when evaluate returns
        self.total_env_steps += steps
        self.busy_s += time.perf_counter() - t_start
        self.cpu_s += time.process_time() - cpu_start
        fitness[~valid] = np.nan
        measures[~valid] = np.nan
        out = {"fitness": fitness, "measures": measures, "length": length, "valid": valid,
               "env_steps": steps, "transitions": returned}
        if collect is not None:
            out.update(obs_sum=obs_sum, obs_sumsq=obs_sumsq, obs_count=obs_count)
        return out

    def close(self) -> None:
        for e in self.envs:
            e.close()
