"""Builds the actor graph on Ray from one config.

The role classes (RolloutWorker, ReplayBuffer, Learner, Coordinator) stay
plain Python; here they become actors with ``ray.remote(**options)(cls)`` and
are wired with small picklable adapters:

- :class:`ReplaySink`: a rollout worker's transition sink, sending chunks
  straight to the replay actor with at most ``max_in_flight`` adds pending;
- :class:`ReplaySampler`: a learner's view of the replay actor;
- :class:`RayEvaluator`: load-balances evaluations over rollout actors in
  small chunks (genomes put in the object store once);
- :class:`LearnerGroup`: fans a jacobian request out to the learners (each
  owns some objectives) and reassembles the rows.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import ray

from dqd_ray.config import ExperimentConfig
from dqd_ray.coordinator import Coordinator
from dqd_ray.envs import env_metadata
from dqd_ray.es_gradients import ESGradient
from dqd_ray.inprocess import Seeds, initial_theta, learner_objectives, split_objectives
from dqd_ray.learner import Learner, loss_metrics
from dqd_ray.policy import PolicySpec
from dqd_ray.replay import ReplayBuffer
from dqd_ray.rollout import RolloutWorker

log = logging.getLogger(__name__)


class ReplaySink:
    """Sends transition chunks to the replay actor with bounded backpressure."""

    def __init__(self, replay, max_in_flight: int = 2):
        self.replay, self.max_in_flight = replay, max_in_flight
        self._pending: list = []

    def __call__(self, chunk: dict, key: tuple | None = None) -> None:
        while len(self._pending) >= self.max_in_flight:
            done, self._pending = ray.wait(self._pending, num_returns=1)
            ray.get(done)
        self._pending.append(self.replay.add.remote(chunk, key))

    def drain(self) -> None:
        if self._pending:
            ray.get(self._pending)
            self._pending = []

    def __getstate__(self):
        return {"replay": self.replay, "max_in_flight": self.max_in_flight, "_pending": []}


class _Future:
    def __init__(self, ref):
        self.ref = ref

    def get(self):
        return ray.get(self.ref)


class ReplaySampler:
    """A learner's sampler over the replay actor."""

    def __init__(self, replay):
        self.replay = replay

    def size(self) -> int:
        return ray.get(self.replay.size.remote())

    def sample(self, batch_size: int, num_batches: int, seed: int | None = None) -> dict:
        return ray.get(self.replay.sample.remote(batch_size, num_batches, seed))

    def sample_async(self, batch_size: int, num_batches: int, seed: int | None = None):
        return _Future(self.replay.sample.remote(batch_size, num_batches, seed))

    def sample_states(self, n: int, seed: int | None = None):
        return ray.get(self.replay.sample_states.remote(n, seed))


class RayEvaluator:
    """Evaluates genomes on rollout actors, a few at a time per actor.

    Chunks are handed out as actors free up, so long and short episodes
    balance. Actors are created with restarts and task retries: a chunk whose
    actor died is rerun once it is back, and its result is taken once.

    Args:
        workers: Rollout actor handles.
        replay: Replay actor handle (committed after every call in keyed mode).
        chunk: Genomes per task.
        keyed: Tag transitions for reproducible ordering (sync mode).
    """

    def __init__(self, workers: list, replay, chunk: int = 4, keyed: bool = False):
        self.workers, self.replay, self.chunk, self.keyed = list(workers), replay, chunk, keyed
        self.calls = 0

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray) -> dict:
        genomes = np.ascontiguousarray(genomes, np.float32)
        n = len(genomes)
        ref = ray.put(genomes)
        parts = [np.arange(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]
        todo = list(range(len(parts)))
        running: dict = {}
        free = list(range(len(self.workers))) * 2  # two tasks queued per actor
        results: dict[int, dict] = {}
        call = self.calls
        self.calls += 1
        while todo or running:
            while todo and free:
                w, p = free.pop(0), todo.pop(0)
                idx = parts[p]
                keys = [(call, int(i)) for i in idx] if self.keyed else None
                task = self.workers[w].evaluate_indices.remote(ref, idx, seeds[idx], keys)
                running[task] = (w, p)
            done, _ = ray.wait(list(running), num_returns=1)
            w, p = running.pop(done[0])
            results[p] = ray.get(done[0])
            free.append(w)
        if self.keyed:
            ray.get(self.replay.commit.remote())
        k = results[0]["measures"].shape[1] if n else 0
        out = {"fitness": np.empty(n), "measures": np.empty((n, k)),
               "length": np.empty(n, np.int64), "valid": np.empty(n, bool), "env_steps": 0}
        for p, res in results.items():
            idx = parts[p]
            for key in ("fitness", "measures", "length", "valid"):
                out[key][idx] = res[key]
            out["env_steps"] += int(res["env_steps"])
        return out


class LearnerGroup:
    """The learners as one gradient source: rows reassembled in objective order."""

    def __init__(self, learners: list, objectives: list[list[int]]):
        self.learners, self.objectives = list(learners), [list(o) for o in objectives]
        self.rows = [o for objs in self.objectives for o in objs]

    def train(self, num_updates: int) -> dict:
        outs = ray.get([lr.train.remote(num_updates) for lr in self.learners])
        return _merge_losses(outs, self.objectives)

    def jacobian(self, genomes: np.ndarray) -> np.ndarray:
        ref = ray.put(np.asarray(genomes, np.float32))
        parts = ray.get([
            lr.jacobian.options(concurrency_group="grad").remote(ref) for lr in self.learners
        ])
        return np.concatenate(parts, axis=1)  # rows in self.rows order

    def greedy_genome(self) -> np.ndarray:
        for lr, objs in zip(self.learners, self.objectives):
            if 0 in objs:
                return ray.get(lr.greedy_genome.options(concurrency_group="grad").remote())
        raise RuntimeError("no learner owns the fitness agent")

    def stats(self) -> dict:
        outs = ray.get([lr.stats.options(concurrency_group="grad").remote()
                        for lr in self.learners])
        merged = _merge_losses(outs, self.objectives)
        merged["updates"] = int(min(o["updates"] for o in outs))
        merged["busy_s"] = float(sum(o["busy_s"] for o in outs))
        return merged


def _merge_losses(outs: list[dict], objectives: list[list[int]]) -> dict:
    merged: dict = {"updates": int(sum(o.get("updates", 0) for o in outs)) if outs else 0}
    if not any("critic_loss" in o for o in outs):
        return merged
    for key in ("critic_loss", "actor_loss"):
        vals = []
        for o, objs in zip(outs, objectives):
            vals.extend(np.asarray(o.get(key, [np.nan] * len(objs)), np.float64).tolist())
        merged[key] = vals
    return merged


@dataclasses.dataclass
class Graph:
    coordinator: object
    workers: list
    replay: object
    learners: list
    learner_objectives: list[list[int]]
    evaluator: RayEvaluator
    num_rollout_workers: int
    learner_device: str

    def kill(self) -> None:
        for h in [self.coordinator, *self.workers, *self.learners, self.replay]:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001 - best effort during shutdown
                pass


class GPUUnavailableError(RuntimeError):
    pass


def resolve_resources(cfg: ExperimentConfig) -> tuple[int, float]:
    """(rollout workers, GPUs per learner) for the connected cluster.

    Raises:
        GPUUnavailableError: GPUs requested strictly but the cluster has none.
    """
    res = ray.cluster_resources()
    gpus = cfg.resources.num_gpus_per_learner
    if gpus > 0 and res.get("GPU", 0) < gpus * cfg.resources.num_learners:
        msg = (f"resources.num_gpus_per_learner={gpus} x {cfg.resources.num_learners} learners "
               f"but the cluster has {res.get('GPU', 0)} GPUs")
        if cfg.resources.strict_gpu:
            raise GPUUnavailableError(msg + " (resources.strict_gpu=true)")
        log.warning("%s: using CPU learners instead", msg)
        print(f"warning: {msg}; using CPU learners instead")
        gpus = 0.0
    learner_cpus = 0 if gpus > 0 else cfg.resources.num_learners
    n = cfg.resources.num_rollout_workers
    if n is None:
        n = max(1, int(res.get("CPU", 1)) - learner_cpus)
    need, have = n + learner_cpus, res.get("CPU", 0)
    if need > have:
        msg = (f"the graph needs {need} CPUs ({n} rollout workers + {learner_cpus} CPU "
               f"learners) but the cluster has {have:g}: actors will wait until an autoscaler "
               "adds nodes; lower resources.num_rollout_workers or resources.num_learners")
        log.warning(msg)
        print(f"warning: {msg}")
    return n, gpus


def build_graph(cfg: ExperimentConfig, *, torch_threads: int | None = None) -> Graph:
    """Creates every actor of one run and wires them."""
    meta = env_metadata(cfg.env.id)
    seeds = Seeds(cfg.seed)
    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    n_workers, gpus = resolve_resources(cfg)
    sync = cfg.resources.learner_mode == "sync"

    replay = ray.remote(num_cpus=0)(ReplayBuffer).remote(
        meta.obs_dim, meta.act_dim, 1 + meta.measure_dim, cfg.td3.replay_capacity,
        seed=Seeds.to_int(seeds.replay))
    worker_cls = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(RolloutWorker)
    workers = [
        worker_cls.remote(cfg.env.id, spec, num_envs=cfg.resources.envs_per_worker,
                          episode_length=cfg.env.episode_length,
                          chunk_size=cfg.resources.chunk_size, sink=ReplaySink(replay))
        for _ in range(n_workers)
    ]
    objectives = learner_objectives(cfg)
    splits = split_objectives(objectives, cfg.resources.num_learners) if objectives else []
    learner_cls = ray.remote(
        num_cpus=0 if gpus > 0 else 1, num_gpus=gpus,
        concurrency_groups={"train": 1, "grad": 1},
    )(Learner)
    learners = [
        learner_cls.remote(spec, 1 + meta.measure_dim, cfg.td3, ReplaySampler(replay),
                           device="auto" if gpus > 0 else "cpu",
                           seed=Seeds.to_int(seeds.learners), objectives=objs,
                           torch_threads=torch_threads)
        for objs in splits
    ]
    chunk = max(1, min(cfg.resources.envs_per_worker, 8))
    evaluator = RayEvaluator(workers, replay, chunk=chunk, keyed=sync)
    group = LearnerGroup(learners, splits) if learners else None
    es = ESGradient(cfg.es.sigma, cfg.es.num_samples, seed=Seeds.to_int(seeds.es)) \
        if cfg.uses_es else None
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(
        solution_dim=spec.genome_dim, x0=initial_theta(cfg, spec, seeds),
        archive_dims=cfg.env.resolved_dims(), archive_ranges=cfg.env.resolved_ranges(),
        qd_offset=meta.qd_offset, algorithm=cfg.algorithm, evaluator=evaluator,
        learner=group, learner_rows=group.rows if group else None, es=es,
        td3_updates=cfg.td3.train_steps_per_iteration if sync else 0,
        seed=Seeds.to_int(seeds.coordinator),
    )
    device = "cuda" if gpus > 0 else "cpu"
    return Graph(coordinator, workers, replay, learners, splits, evaluator, n_workers, device)


def start_learners(graph: Graph, cfg: ExperimentConfig) -> None:
    """Async mode: learners train in the background from now on."""
    if cfg.resources.learner_mode == "async":
        ray.get([lr.start_async.options(concurrency_group="train").remote()
                 for lr in graph.learners])


def stop_learners(graph: Graph, timeout_s: float = 60.0) -> None:
    """Stops background training; gives up (with a warning) on learners that
    do not answer in ``timeout_s``, e.g. ones never placed: they are killed next."""
    refs = [lr.stop_async.options(concurrency_group="grad").remote() for lr in graph.learners]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ray.get(done)
    if pending:
        msg = (f"{len(pending)} of {len(refs)} learners did not stop within {timeout_s:g} s "
               "(never placed, or busy): killing them")
        log.warning(msg)
        print(f"warning: {msg}")


class RaySystem:
    """The runner's view of a graph: iterations, state, stats, shutdown."""

    def __init__(self, cfg: ExperimentConfig, torch_threads: int | None = None):
        self.cfg = cfg
        self.graph = build_graph(cfg, torch_threads=torch_threads)
        self.group = LearnerGroup(self.graph.learners, self.graph.learner_objectives) \
            if self.graph.learners else None

    def start(self) -> None:
        start_learners(self.graph, self.cfg)

    def iteration(self) -> dict:
        m = ray.get(self.graph.coordinator.iteration.remote())
        if self.group is not None and self.cfg.resources.learner_mode == "async":
            m.update(loss_metrics(self.group.stats()))
        return m

    def state(self, save_replay: bool = True) -> dict:
        g = self.graph
        coord = g.coordinator
        refs = {
            "coordinator": coord.state_dict.remote(),
            "archive": coord.archive_arrays.remote(),
            "learners": [lr.state_dict.options(concurrency_group="grad").remote()
                         for lr in g.learners],
            "replay": g.replay.state_dict.remote() if save_replay else None,
        }
        return {
            "coordinator": ray.get(refs["coordinator"]),
            "archive": ray.get(refs["archive"]),
            "learners": ray.get(refs["learners"]),
            "replay": None if refs["replay"] is None else ray.get(refs["replay"]),
        }

    def load(self, state: dict) -> None:
        g = self.graph
        if len(state["learners"]) != len(g.learners):
            raise ValueError(f"checkpoint has {len(state['learners'])} learner states, this "
                             f"graph has {len(g.learners)} learners (resources.num_learners)")
        refs = [g.coordinator.load_state_dict.remote(state["coordinator"])]
        refs += [lr.load_state_dict.remote(s) for lr, s in zip(g.learners, state["learners"])]
        if state.get("replay") is not None:
            refs.append(g.replay.load_state_dict.remote(state["replay"]))
        ray.get(refs)

    def archive(self) -> dict:
        return ray.get(self.graph.coordinator.archive_arrays.remote())

    def system_stats(self) -> dict:
        g = self.graph
        workers = ray.get([w.stats.remote() for w in g.workers])
        out = {"worker_busy_s": float(sum(w["busy_s"] for w in workers)),
               "num_rollout_workers": len(g.workers),
               "replay_size": ray.get(g.replay.size.remote())}
        out["critic_updates"] = self.group.stats()["updates"] if self.group else 0
        return out

    def close(self) -> None:
        try:
            if self.graph.learners:
                stop_learners(self.graph)
        finally:
            self.graph.kill()
