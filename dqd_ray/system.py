"""The roles' interfaces and the one builder of a run's system.

Every role is a plain class (RolloutWorker, ReplayBuffer, Learner,
Coordinator). :func:`build` creates all of them from one config through a
*placement*:

- :class:`InProcess`: plain objects in this process (debugging, tests);
- :class:`OnRay`: actors, ``ray.remote(**options)(cls).remote(...)``.

The wiring (who evaluates on which workers, which learner owns which
critics, where transitions go) is written once, over the placement's
``make``/``call``/``get``, the way RLlib builds local and remote env runners
from one code path. Both placements honour every ``resources`` field; where
the in-process one must differ it says so in a warning.

Interfaces (duck-typed; see the Protocols below):

- evaluator: ``evaluate(genomes, seeds, record=True) -> {"fitness", "measures",
  "length", "valid", "env_steps"}``;
- gradient source (the learners): ``jacobian``, ``greedy_genome``,
  ``pg_variation``, ``stage_training``, ``stats``;
- replay sampler: ``size``, ``sample``, ``sample_states``; replay sink:
  ``sink(chunk, key=None)``;
- saveable: ``state_dict()``, ``load_state_dict(state)``.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dqd_ray import algorithms
from dqd_ray.config import ExperimentConfig
from dqd_ray.coordinator import Coordinator
from dqd_ray.envs import env_metadata
from dqd_ray.es_gradients import ESGradient
from dqd_ray.learner import Learner, StagedTraining, loss_metrics
from dqd_ray.policy import PolicySpec
from dqd_ray.replay import ReplayBuffer
from dqd_ray.rollout import RolloutWorker

log = logging.getLogger(__name__)


# -- interfaces ----------------------------------------------------------------------


class Evaluator(Protocol):
    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray, record: bool = True,
                 **options) -> dict: ...


class GradientSource(Protocol):
    def jacobian(self, genomes: np.ndarray) -> np.ndarray: ...
    def greedy_genome(self) -> np.ndarray: ...
    def pg_variation(self, genomes: np.ndarray, steps: int, lr: float,
                     num_states: int) -> np.ndarray: ...
    def stage_training(self, num_updates: int) -> StagedTraining: ...
    def stats(self) -> dict: ...


class ReplaySampler(Protocol):
    def size(self) -> int: ...
    def sample(self, batch_size: int, num_batches: int, seed: int | None = None) -> dict: ...
    def sample_states(self, n: int, seed: int | None = None) -> np.ndarray: ...


class Saveable(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


# -- placements ----------------------------------------------------------------------


class _Done:
    """An in-process call's result, shaped like a future."""

    def __init__(self, value):
        self.value = value


class InProcess:
    """Roles as plain objects; calls run at once, in this process."""

    name = "inprocess"

    def make(self, cls, options: dict, *args, **kw):
        return cls(*args, **kw)

    def call(self, handle, method: str, *args, group: str | None = None, **kw):
        return _Done(getattr(handle, method)(*args, **kw))

    def get(self, futures, timeout: float | None = None):
        if isinstance(futures, list):
            return [f.value for f in futures]
        return futures.value

    def wait_any(self, futures: list) -> tuple[Any, list]:
        return futures[0], futures[1:]

    def get_long(self, future, ping):
        """A long call (a whole iteration): in process it has already run."""
        return self.get(future)

    def put(self, value):
        return value

    def sink(self, replay):
        return replay.add

    def sampler(self, replay):
        return replay

    def kill(self, handle) -> None:
        close = getattr(handle, "close", None)
        if close is not None:
            close()


class OnRay:
    """Roles as Ray actors; calls return object refs.

    Every wait has a deadline (see :mod:`dqd_ray.waits`): a call that gets no
    answer within ``call_timeout_s`` from a live actor, or whose actor stays
    restarting longer than ``restart_timeout_s``, raises a
    :class:`~dqd_ray.waits.CallTimeoutError` naming the role (the ``role``
    option given to :meth:`make`), the method and the node.
    """

    name = "ray"

    def __init__(self, call_timeout_s: float = 600.0, restart_timeout_s: float = 600.0):
        self.call_timeout_s, self.restart_timeout_s = call_timeout_s, restart_timeout_s
        self._names: dict[int, str] = {}
        self._roles: dict[str, str] = {}  # actor id (hex) -> "rollout worker 3"
        self._calls: dict = {}  # pending ref -> (method, actor id)

    def __getstate__(self):
        # Pickled into the coordinator: roles travel, pending calls do not.
        return {**self.__dict__, "_calls": {}, "_names": dict(self._names)}

    def make(self, cls, options: dict, *args, **kw):
        import ray

        from dqd_ray.waits import actor_id_of

        options = dict(options)
        role = options.pop("role", cls.__name__)
        handle = ray.remote(**options)(cls).remote(*args, **kw)
        self._roles[actor_id_of(handle) or ""] = role
        return handle

    def call(self, handle, method: str, *args, group: str | None = None, **kw):
        from dqd_ray.waits import actor_id_of

        m = getattr(handle, method)
        if group is not None:
            m = m.options(concurrency_group=group)
        ref = m.remote(*args, **kw)
        if len(self._calls) > 4096:  # refs never waited for (fire and forget)
            self._calls.clear()
        self._calls[ref] = (method, actor_id_of(handle))
        return ref

    def _what(self, ref) -> tuple[str, str, str | None]:
        method, aid = self._calls.get(ref, ("?", None))
        return self._roles.get(aid or "", "an actor"), method, aid

    def _forget(self, refs) -> None:
        for r in refs:
            self._calls.pop(r, None)

    def get(self, futures, timeout: float | None = None):
        """Results; a :class:`~dqd_ray.waits.CallTimeoutError` (a ``TimeoutError``)
        names the role, call and node when a deadline passes first (``timeout``,
        default ``call_timeout_s``)."""
        from dqd_ray.waits import get_refs

        try:
            return get_refs(futures, timeout_s=timeout or self.call_timeout_s,
                            restart_timeout_s=self.restart_timeout_s, what=self._what)
        finally:
            self._forget(futures if isinstance(futures, list) else [futures])

    def wait_any(self, futures: list) -> tuple[Any, list]:
        """The first of ``futures`` to finish; a deadline error when none answers
        within ``call_timeout_s``."""
        from dqd_ray.waits import wait_refs

        done, rest = wait_refs(futures, 1, timeout_s=self.call_timeout_s,
                               restart_timeout_s=self.restart_timeout_s, what=self._what)
        return done[0], rest

    def get_long(self, future, ping):
        """A call that may legitimately run long (a whole iteration, made of
        many bounded calls): waited for as long as ``ping()`` (a call to the same
        actor in another concurrency group) keeps answering within
        ``call_timeout_s``, so a wedged actor is still found out."""
        import ray

        try:
            while True:
                done, _ = ray.wait([future], timeout=self.call_timeout_s, fetch_local=False)
                if done:
                    return ray.get(future)
                self.get(ping())
        finally:
            self._forget([future])

    def put(self, value):
        import ray

        return ray.put(value)

    # Workers and learners give the replay buffer a quarter of the deadline:
    # when it is the one stuck, its own deadline fires first and the message
    # names it, not the worker or learner waiting on it.
    def sink(self, replay):
        return ReplaySink(self._names.get(id(replay), replay),
                          timeout_s=self.call_timeout_s / 4,
                          restart_timeout_s=self.restart_timeout_s)

    def sampler(self, replay):
        return ReplayActorSampler(self._names.get(id(replay), replay),
                                  timeout_s=self.call_timeout_s / 4,
                                  restart_timeout_s=self.restart_timeout_s)

    def named(self, handle, name: str):
        """Remembers that ``handle`` was created under ``name`` (see :meth:`sink`)."""
        self._names[id(handle)] = name
        return handle

    def kill(self, handle) -> None:
        import ray

        try:
            ray.kill(handle)
        except Exception:  # noqa: BLE001 - best effort during shutdown
            pass


PLACEMENTS = {"inprocess": InProcess, "ray": OnRay}


def make_placement(name: str, resources) -> InProcess | OnRay:
    """The placement ``name`` with the deadlines of ``resources`` (Ray only)."""
    if name not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {name!r}")
    if name == "ray":
        return OnRay(call_timeout_s=resources.call_timeout_s,
                     restart_timeout_s=resources.wait_for_resources_s)
    return InProcess()


from dqd_ray.replay_actor import (  # noqa: E402,F401 - re-exported
    ReplayActor, ReplayActorSampler, ReplaySink, _Future, _reconstructed, _resolve)


# -- the evaluator and the learner group, over any placement ---------------------------


class PooledEvaluator:
    """Evaluates genomes on the rollout workers, a few genomes per call.

    On Ray, chunks go to actors as they free up (two queued per actor), so
    long and short episodes balance; actors restart and retry, and a chunk's
    result is taken once. In process the chunks run one after another. In
    keyed mode (sync learners) transitions are staged per genome and the
    replay buffer commits them in genome order after each call, so which
    worker ran which genome changes nothing.
    """

    def __init__(self, placement, workers: list, replay, chunk: int = 4, keyed: bool = False):
        self.placement, self.workers, self.replay = placement, list(workers), replay
        self.chunk, self.keyed = chunk, keyed
        self.calls = 0

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray, record: bool = True,
                 **options) -> dict:
        """One episode per genome; ``options`` go to :meth:`RolloutWorker.evaluate`
        (``action_noise``, and ``collect_obs``, one flag per genome)."""
        p = self.placement
        genomes = np.ascontiguousarray(genomes, np.float32)
        seeds = np.asarray(seeds)
        n = len(genomes)
        ref = p.put(genomes)
        if isinstance(p, InProcess):  # one call per worker: its envs step in lockstep
            parts = [a for a in np.array_split(np.arange(n), len(self.workers)) if len(a)]
        else:
            # Smaller chunks when there are more workers than chunks: every
            # worker gets work (96 workers, 101 genomes: chunks of 2, not 4).
            size = max(1, min(self.chunk, -(-n // max(1, len(self.workers)))))
            parts = [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
        todo = list(range(len(parts)))
        running: dict = {}
        free = list(range(len(self.workers))) * 2
        results: dict[int, dict] = {}
        call = self.calls
        self.calls += 1
        keyed = self.keyed and record
        while todo or running:
            while todo and free:
                w, part = free.pop(0), todo.pop(0)
                idx = parts[part]
                keys = [(call, int(i)) for i in idx] if keyed else None
                opts = {k: (np.asarray(v)[idx] if np.ndim(v) else v) for k, v in options.items()}
                fut = p.call(self.workers[w], "evaluate_indices", ref, idx, seeds[idx], keys,
                             record, opts or None)
                running[id(fut)] = (fut, w, part)
            done, _ = p.wait_any([f for f, _, _ in running.values()])
            _, w, part = running.pop(id(done))
            results[part] = p.get(done)
            free.append(w)
        if keyed:
            p.get(p.call(self.replay, "commit"))
        k = results[0]["measures"].shape[1] if n else 0
        out = {"fitness": np.empty(n), "measures": np.empty((n, k)),
               "length": np.empty(n, np.int64), "valid": np.empty(n, bool), "env_steps": 0}
        per_genome = ["fitness", "measures", "length", "valid"]
        if options.get("collect_obs") is not None and n:
            per_genome += ["obs_sum", "obs_sumsq", "obs_count"]
            for key in per_genome[4:]:
                first = results[0][key]
                out[key] = np.empty((n, *first.shape[1:]), first.dtype)
        for part, res in results.items():
            idx = parts[part]
            for key in per_genome:
                out[key][idx] = res[key]
            out["env_steps"] += int(res["env_steps"])
        return out


class LearnerGroup:
    """The learners as one gradient source: rows reassembled in objective order.

    On Ray, learners are restartable actors. The coordinator's group checks
    each learner's incarnation around every request; a learner that Ray
    restarted (its node died) gets the critics of the group's latest snapshot
    (taken every ``snapshot_every`` iterations and after a checkpoint is
    loaded), restarts background training in async mode, and the request is
    repeated, so no gradient ever comes from untrained critics.

    Args:
        placement: The placement the learners live on.
        learners: Learner handles (or objects, in process).
        objectives: Objectives of each learner.
        async_train: Learners train in the background (restarted after a restore).
        snapshot_every: Iterations between snapshots (0: none).
        restart_timeout_s: How long a check waits for a restarting learner.
    """

    def __init__(self, placement, learners: list, objectives: list[list[int]], *,
                 async_train: bool = False, snapshot_every: int = 0,
                 restart_timeout_s: float | None = None):
        self.placement, self.learners = placement, list(learners)
        self.objectives = [list(o) for o in objectives]
        self.rows = [o for objs in self.objectives for o in objs]
        self.async_train, self.snapshot_every = async_train, snapshot_every
        self.restart_timeout_s = restart_timeout_s
        self._known: list[str] | None = None
        self._snapshot: list | None = None
        self.snapshot_iteration: int | None = None
        self.restarts = 0
        # A fixed buffer batch and each learner's critic loss on it at the last
        # snapshot: a restore is checked (and reported) against it.
        self._probe: dict | None = None
        self._snapshot_probe: list[float] | None = None

    def _all(self, method: str, *args, group: str | None = "grad") -> list:
        p = self.placement
        return p.get([p.call(lr, method, *args, group=group) for lr in self.learners])

    # -- restarts ------------------------------------------------------------

    def check(self) -> bool:
        """Restores every learner restarted since the last check; True if any was.

        Raises:
            RuntimeError: A learner did not answer within ``restart_timeout_s``
                (restarting, with no node able to host it).
        """
        p = self.placement
        try:
            ids = p.get([p.call(lr, "incarnation_id", group="grad") for lr in self.learners],
                        timeout=self.restart_timeout_s)
        except TimeoutError as err:
            from dqd_ray.waits import CallTimeoutError

            raise CallTimeoutError(
                f"{err} (a learner restarting with no node to host it? "
                "resources.learner_resource, GPUs); add nodes and resume the run, or raise "
                "resources.wait_for_resources_s") from None
        if self._known is None:
            self._known = ids
            return False
        restarted = [i for i, (a, b) in enumerate(zip(self._known, ids)) if a != b]
        for i in restarted:
            lr = self.learners[i]
            if self._snapshot is not None:
                fresh = self._probe_loss(lr)
                p.get(p.call(lr, "load_state_dict", self._snapshot[i], group="grad"))
                what = (f"restored the critics of iteration {self.snapshot_iteration} "
                        f"({int(self._snapshot[i].get('updates', 0))} updates)")
                if fresh is not None and self._snapshot_probe is not None:
                    what += (f"; probe critic loss {self._snapshot_probe[i]:.6g} at the "
                             f"snapshot, {self._probe_loss(lr):.6g} restored, "
                             f"{fresh:.6g} before the restore")
            else:
                what = "no snapshot yet: it starts from scratch"
            if self.async_train:
                p.get(p.call(lr, "start_async", group="train"))
            self.restarts += 1
            _warn(f"learner {i} was restarted (its node died?); {what}")
        self._known = ids
        return bool(restarted)

    def _guarded(self, fn):
        for _ in range(3):
            self.check()
            out = fn()
            if not self.check():
                return out
        raise RuntimeError("learners restarted during three attempts of one gradient "
                           "request; is a learner node failing repeatedly?")

    def snapshot(self, iteration: int) -> None:
        """Keeps a copy of every learner's state, to restore a restarted learner."""
        self.check()
        if self._probe is None:
            p = self.placement
            self._probe = p.get(p.call(self.learners[0], "probe_batch", 256, 20220516,
                                       group="grad"))
        states = self._all("snapshot", self._probe)
        self._snapshot = [st for st, _ in states]
        self._snapshot_probe = [loss for _, loss in states] if self._probe is not None else None
        self.snapshot_iteration = iteration

    def _probe_loss(self, learner) -> float | None:
        if self._probe is None:
            return None
        p = self.placement
        return p.get(p.call(learner, "probe_loss", self._probe, group="grad"))

    def after_iteration(self, iteration: int) -> None:
        """Called by the coordinator at the end of each iteration."""
        if self.snapshot_every and (iteration == 1 or iteration % self.snapshot_every == 0):
            self.snapshot(iteration)
        else:
            self.check()

    # -- the gradient source -------------------------------------------------------

    def _fitness_learner(self):
        for lr, objs in zip(self.learners, self.objectives):
            if 0 in objs:
                return lr
        raise RuntimeError("no learner owns the fitness agent")

    def train(self, num_updates: int) -> dict:
        return self._guarded(lambda: _merge_losses(self._all("train", num_updates, group=None),
                                                   self.objectives))

    def stage_training(self, num_updates: int) -> StagedTraining:
        p = self.placement
        self._guarded(lambda: self._all("stage", num_updates))
        started: list = []

        def start() -> None:
            started.extend(p.call(lr, "train_staged", group="train") for lr in self.learners)

        def wait() -> dict:
            if not started:
                start()
            out = _merge_losses(p.get(started), self.objectives)
            if self.check():  # a restarted learner lost its staged batches
                out["updates"] = 0
            return out

        return StagedTraining(wait, start)

    def jacobian(self, genomes: np.ndarray) -> np.ndarray:
        ref = self.placement.put(np.asarray(genomes, np.float32))
        # rows in self.rows order
        return self._guarded(lambda: np.concatenate(self._all("jacobian", ref), axis=1))

    def greedy_genome(self) -> np.ndarray:
        p = self.placement
        return self._guarded(lambda: p.get(p.call(self._fitness_learner(), "greedy_genome",
                                                  group="grad")))

    def pg_variation(self, genomes, steps: int, lr: float, num_states: int) -> np.ndarray:
        p = self.placement
        return self._guarded(lambda: p.get(p.call(self._fitness_learner(), "pg_variation",
                                                  genomes, steps, lr, num_states,
                                                  group="grad")))

    def stats(self) -> dict:
        outs = self._all("stats")
        merged = _merge_losses(outs, self.objectives)
        merged["updates"] = int(min(o["updates"] for o in outs))
        merged["busy_s"] = float(sum(o["busy_s"] for o in outs))
        merged["lr"] = float(outs[0]["lr"])
        return merged


def _merge_losses(outs: list[dict], objectives: list[list[int]]) -> dict:
    # Every learner does the same updates on its own critics: count them once.
    merged: dict = {"updates": int(min(o.get("updates", 0) for o in outs)) if outs else 0}
    if any("train_s" in o for o in outs):  # learners train side by side: the slowest
        merged["train_s"] = max(float(o.get("train_s", 0.0)) for o in outs)
    if not any("critic_loss" in o for o in outs):
        return merged
    for key in ("critic_loss", "actor_loss"):
        vals = []
        for o, objs in zip(outs, objectives):
            vals.extend(np.asarray(o.get(key, [np.nan] * len(objs)), np.float64).tolist())
        merged[key] = vals
    return merged


# -- seeds and sizes -----------------------------------------------------------------


class Seeds:
    """All seeds of a run, spawned from the root seed."""

    def __init__(self, root: int):
        ss = np.random.SeedSequence(root)
        (self.coordinator, self.policy, self.replay, self.learners,
         self.es, self.workers) = ss.spawn(6)

    @staticmethod
    def to_int(ss: np.random.SeedSequence) -> int:
        return int(ss.generate_state(1)[0])


def algorithm_needs(cfg: ExperimentConfig) -> algorithms.Needs:
    k = env_metadata(cfg.env.id).measure_dim
    return algorithms.get(cfg.algorithm.name).needs(cfg.algorithm, k)


def evaluations_per_iteration(cfg: ExperimentConfig) -> int:
    """Evaluations one iteration counts, from the config alone (robustness
    re-evaluations are not counted)."""
    a, needs = cfg.algorithm, algorithm_needs(cfg)
    if needs.dqd:
        es = cfg.es.num_samples if needs.es_rows else 0
        return a.num_emitters * (1 + es + a.batch_size) + int(needs.greedy_insert)
    if a.name == "pga_me":
        return a.iso_batch_size + a.pg_batch_size
    if a.name == "me_es":
        return algorithms.me_es.evaluations_per_iteration(a)
    return a.batch_size


def learner_objectives(cfg: ExperimentConfig) -> list[int]:
    """Objectives with a TD3 critic (none: no learner is built)."""
    return list(algorithm_needs(cfg).critic_objectives)


def split_objectives(objectives: list[int], num_learners: int) -> list[list[int]]:
    """Splits the critics between learners as evenly as possible (none empty)."""
    n = max(1, min(num_learners, len(objectives)))
    return [[int(o) for o in part] for part in np.array_split(objectives, n)]


def initial_theta(cfg: ExperimentConfig, spec: PolicySpec, seeds: Seeds) -> np.ndarray:
    if cfg.algorithm.x0_from_policy_init:
        return spec.init_genome(np.random.default_rng(seeds.policy))
    return np.zeros(spec.genome_dim, np.float32)


class GPUUnavailableError(RuntimeError):
    pass


class ResourceError(RuntimeError):
    """The graph cannot be placed on the resources it was given."""


# Settings that place or size Ray actors: in process they have nothing to act on.
RAY_ONLY_RESOURCES = ("cpus_per_worker", "cpus_per_learner", "rollout_resource",
                      "learner_resource", "replay_resource", "pin_to_head",
                      "wait_for_resources_s", "call_timeout_s")


def _warn_ray_only_fields(r) -> None:
    default = type(r)()
    changed = [f"resources.{k}={getattr(r, k)!r}" for k in RAY_ONLY_RESOURCES
               if getattr(r, k) != getattr(default, k)]
    if changed:
        _warn(", ".join(changed) + ": Ray placement settings; in process every role runs "
              "in this one process, so they have no effect here")


def _warn(msg: str) -> None:
    log.warning(msg)
    print(f"warning: {msg}")


def _placement_group_resources() -> dict | None:
    """Total resources of the placement group this process runs in (a Tune
    trial), or None outside one."""
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:
        return None
    total: dict[str, float] = {}
    for bundle in pg.bundle_specs:
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()``
    without an address): nothing will add resources to it."""
    try:
        import ray._private.worker as rw

        return bool(getattr(rw.global_worker.node, "head", False))
    except Exception:  # noqa: BLE001 - an unknown Ray layout: treat as a cluster
        return False


def actor_bundles(cfg: ExperimentConfig, n_workers: int,
                  gpus: float) -> tuple[list[dict], list[dict]]:
    """The resources each rollout worker and each learner actor asks for
    (``gpus`` per learner: 0 means CPU learners)."""
    r = cfg.resources
    objs = learner_objectives(cfg)
    n_learners = len(split_objectives(objs, r.num_learners)) if objs else 0
    worker = {"CPU": float(r.cpus_per_worker)}
    if r.rollout_resource:
        worker[r.rollout_resource] = float(r.cpus_per_worker)
    learner = {"GPU": float(gpus)} if gpus > 0 else {"CPU": float(r.cpus_per_learner)}
    if r.learner_resource:
        learner[r.learner_resource] = 1.0
    return [dict(worker) for _ in range(n_workers)], [dict(learner) for _ in range(n_learners)]


def graph_bundles(cfg: ExperimentConfig, n_workers: int, gpus: float) -> list[dict]:
    """One resource bundle per actor of the graph that asks for resources (what
    the autoscaler must find room for, node by node)."""
    workers, learners = actor_bundles(cfg, n_workers, gpus)
    bundles = [*workers, *learners]
    if cfg.resources.replay_resource:
        bundles.append({cfg.resources.replay_resource: 1.0})
    return [{k: v for k, v in b.items() if v > 0} for b in bundles]


def graph_needs(cfg: ExperimentConfig, n_workers: int, gpus: float) -> dict[str, float]:
    """The Ray resources the whole graph asks for (the sum over its actors)."""
    need = {"CPU": 0.0}
    for bundle in graph_bundles(cfg, n_workers, gpus):
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    return need


def _missing(need: dict, have: dict) -> dict[str, tuple[float, float]]:
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def _describe(missing: dict, where: str, n: int, cfg: ExperimentConfig) -> str:
    parts = ", ".join(f"{k} {v:g} (has {h:g})" for k, (v, h) in missing.items())
    return (f"the graph ({n} rollout workers x {cfg.resources.cpus_per_worker:g} CPU, "
            f"learners, coordinator, replay) needs {parts} but {where} does not have them: "
            "lower resources.num_rollout_workers (or cpus_per_worker, num_learners, "
            "num_gpus_per_learner), drop resources.rollout_resource/learner_resource/"
            "replay_resource on a "
            "machine that does not offer them, or add nodes")


def resolve_resources(cfg: ExperimentConfig, placement: str = "ray") -> tuple[int, float]:
    """(rollout workers, GPUs per learner) for this placement.

    On Ray: sized from the placement group this process runs in (a Tune
    trial: its bundles are all the graph may use), else from the connected
    cluster's resources. A graph that cannot fit is an error at once when this
    process started Ray itself (or in a placement group); on a cluster joined
    by address the autoscaler gets ``resources.wait_for_resources_s`` to add
    nodes, with a message every 30 s. In process: one worker unless set,
    GPUs if torch sees one.

    Raises:
        GPUUnavailableError: GPUs requested strictly but there are none.
        ResourceError: The graph cannot fit, naming what is missing.
    """
    r = cfg.resources
    gpus = r.num_gpus_per_learner
    n_learners = len(split_objectives(learner_objectives(cfg), r.num_learners)) \
        if learner_objectives(cfg) else 0
    pg = None
    if placement == "ray":
        import ray

        pg = _placement_group_resources()
        res = pg if pg is not None else ray.cluster_resources()
        have_gpus = res.get("GPU", 0)
        where = "the trial's placement group" if pg is not None else "the cluster"
    else:
        import torch

        res = {}
        have_gpus = torch.cuda.device_count()
        where = "this process"
    # On a cluster joined by address the autoscaler may still bring GPU nodes:
    # missing GPUs are waited for below like any other resource.
    joined = placement == "ray" and pg is None and not _started_here()
    if gpus > 0 and n_learners and have_gpus < gpus * n_learners and not joined:
        msg = (f"resources.num_gpus_per_learner={gpus} x {n_learners} learners "
               f"but {where} has {have_gpus} GPUs")
        if r.strict_gpu:
            raise GPUUnavailableError(msg + " (resources.strict_gpu=true)")
        _warn(f"{msg}; using CPU learners instead")
        gpus = 0.0
    learner_cpus = 0.0 if gpus > 0 else n_learners * r.cpus_per_learner
    n = r.num_rollout_workers
    if placement != "ray":
        return (1 if n is None else n), gpus
    if n is None:
        n = max(1, int((res.get("CPU", 1) - learner_cpus) / r.cpus_per_worker + 1e-9))
    need = graph_needs(cfg, n, gpus)
    bundles = graph_bundles(cfg, n, gpus)
    missing = _missing(need, res)
    # Totals are not enough: each actor's bundle must fit on one node, or it
    # waits forever (a placement group's bundles were placed by Tune already).
    homeless = [] if pg is not None else _homeless(bundles, _node_resources())
    if not missing and not homeless:
        return n, gpus
    if pg is not None:  # nothing will ever add resources to a placement group
        raise ResourceError(_describe(missing, where, n, cfg)
                            + "; the trial's bundles must match its config")
    if _started_here():
        if missing:
            raise ResourceError(_describe(missing, "this machine's Ray", n, cfg))
        raise ResourceError(_describe_homeless(homeless, "this machine's Ray"))
    import ray

    _request_from_autoscaler(bundles)
    t0 = time.monotonic()
    last_msg = -1e9
    while (missing or homeless) and time.monotonic() - t0 < r.wait_for_resources_s:
        if time.monotonic() - last_msg >= 30:
            _warn(f"waiting up to {r.wait_for_resources_s:g} s for the autoscaler: "
                  + ", ".join([f"{k} {v:g} needed, {h:g} now" for k, (v, h) in missing.items()]
                              + [f"a node for {b}" for b in homeless[:1]]))
            last_msg = time.monotonic()
        time.sleep(min(2.0, max(0.0, r.wait_for_resources_s - (time.monotonic() - t0))))
        missing = _missing(need, ray.cluster_resources())
        homeless = _homeless(bundles, _node_resources())
    if missing or homeless:
        _request_from_autoscaler([])  # withdraw the request: nothing will use it
        where = f"the cluster (after waiting {r.wait_for_resources_s:g} s)"
        if missing:
            raise ResourceError(_describe(missing, where, n, cfg))
        raise ResourceError(_describe_homeless(homeless, where))
    return n, gpus


def _node_resources() -> list[dict]:
    """Each live node's total resources (what one actor's bundle can be given)."""
    import ray

    return [dict(nd.get("Resources", {}), _ip=nd.get("NodeManagerAddress", "?"))
            for nd in ray.nodes() if nd.get("Alive")]


def _homeless(bundles: list[dict], nodes: list[dict]) -> list[dict]:
    """The bundles that no single node can hold (deduplicated, in order)."""
    def fits(b, nd):
        return all(v <= nd.get(k, 0.0) + 1e-9 for k, v in b.items())

    out: list[dict] = []
    for b in bundles:
        if b not in out and not any(fits(b, nd) for nd in nodes):
            out.append(b)
    return out


def _describe_homeless(homeless: list[dict], where: str) -> str:
    bundle = ", ".join(f"{k} {v:g}" for k, v in homeless[0].items())
    return (f"an actor of the graph asks for {{{bundle}}} in one bundle but no single node "
            f"of {where} can hold it, although the totals would: lower "
            "resources.cpus_per_worker or cpus_per_learner (or num_gpus_per_learner), or add "
            "a node type that large")


def _request_from_autoscaler(bundles: list[dict]) -> None:
    """Asks the cluster's autoscaler to make room for ``bundles`` (nodes of types
    with ``min_workers: 0`` start only on such demand); an empty list withdraws
    the request. A cluster without an autoscaler ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        if bundles:
            print(f"asked the autoscaler for {len(bundles)} resource bundles "
                  f"({', '.join(sorted({k for b in bundles for k in b}))})", flush=True)
    except Exception as e:  # noqa: BLE001 - waiting still works, only slower
        log.warning("could not ask the autoscaler for %d bundles: %s", len(bundles), e)


# -- the builder ---------------------------------------------------------------------


class System:
    """Every role of one run, built from its config on a placement.

    Args:
        cfg: The validated config.
        placement: ``"inprocess"`` or ``"ray"`` (Ray must be initialized).
        torch_threads: Torch intra-op threads per learner (default: config).
        run_dir: The run directory, if any: a restarted replay actor reloads
            the replay data of its newest checkpoint.
    """

    def __init__(self, cfg: ExperimentConfig, placement: str = "ray",
                 torch_threads: int | None = None, run_dir=None):
        self.cfg = cfg
        self.placement_name = placement
        r = cfg.resources
        self.p = p = make_placement(placement, r)
        torch_threads = torch_threads or r.torch_threads
        meta = env_metadata(cfg.env.id)
        seeds = Seeds(cfg.seed)
        self.spec = spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        needs = algorithm_needs(cfg)
        n_workers, gpus = resolve_resources(cfg, placement)
        self.sync = r.learner_mode == "sync"
        if placement == "inprocess" and n_workers > 1:
            _warn(f"resources.num_rollout_workers={n_workers}: in process the workers "
                  "evaluate one after another (same numbers as on Ray, no parallelism)")
        if placement == "inprocess":
            _warn_ray_only_fields(r)

        worker_opts = {"num_cpus": r.cpus_per_worker, "max_restarts": -1,
                       "max_task_retries": -1}
        if r.rollout_resource:
            worker_opts["resources"] = {r.rollout_resource: r.cpus_per_worker}
        # The coordinator and the replay buffer ask for no CPU; pinned, they land
        # on the head node (Ray's built-in node:__internal_head__ resource).
        central_opts = {"num_cpus": 0}
        if r.pin_to_head:
            central_opts["resources"] = {"node:__internal_head__": 0.001}
        replay_opts = dict(central_opts)
        if r.replay_resource:
            replay_opts["resources"] = {r.replay_resource: 1}
        replay_kw = {}
        if placement == "ray":
            # Restartable; workers and learners find it by name (see ReplaySink).
            replay_opts.update(name=f"dqd-ray-replay-{uuid.uuid4().hex[:12]}",
                               max_restarts=-1, max_task_retries=-1)
            if run_dir is not None:
                replay_kw["checkpoints"] = str(Path(run_dir).resolve() / "checkpoints")
        self.replay = p.make(ReplayActor, {**replay_opts, "role": "the replay buffer"},
                             meta.obs_dim, meta.act_dim,
                             1 + meta.measure_dim, cfg.td3.replay_capacity,
                             seed=Seeds.to_int(seeds.replay), **replay_kw)
        if placement == "ray":
            p.named(self.replay, replay_opts["name"])
        self.workers = [
            p.make(RolloutWorker, {**worker_opts, "role": f"rollout worker {i}"}, cfg.env.id,
                   spec, num_envs=r.envs_per_worker, episode_length=cfg.env.episode_length,
                   chunk_size=r.chunk_size, sink=p.sink(self.replay),
                   time_limit_done=cfg.td3.time_limit_done)
            for i in range(n_workers)
        ]
        self.splits = split_objectives(list(needs.critic_objectives), r.num_learners) \
            if needs.critic_objectives else []
        if placement == "inprocess" and gpus > 0:
            device = "auto"
        else:
            device = "auto" if gpus > 0 else "cpu"
        learner_opts = {"num_cpus": 0 if gpus > 0 else r.cpus_per_learner, "num_gpus": gpus,
                        "concurrency_groups": {"train": 1, "grad": 1}}
        if placement == "ray":  # restored by the coordinator's LearnerGroup
            learner_opts.update(max_restarts=-1, max_task_retries=-1)
        if r.learner_resource:
            learner_opts["resources"] = {r.learner_resource: 1}
        self.learners = [
            p.make(Learner, {**learner_opts, "role": f"learner {i} (objectives {objs})"}, spec,
                   1 + meta.measure_dim, cfg.td3, p.sampler(self.replay), device=device,
                   seed=Seeds.to_int(seeds.learners), objectives=objs,
                   torch_threads=torch_threads)
            for i, objs in enumerate(self.splits)
        ]
        self.learner_device = "cuda" if gpus > 0 else "cpu"
        self.group = LearnerGroup(
            p, self.learners, self.splits, async_train=not self.sync,
            snapshot_every=cfg.checkpoint.learner_snapshot_every if placement == "ray" else 0,
            restart_timeout_s=max(60.0, r.wait_for_resources_s),
        ) if self.learners else None
        chunk = max(1, min(r.envs_per_worker, 8))
        self.evaluator = evaluator = PooledEvaluator(p, self.workers, self.replay, chunk=chunk,
                                                     keyed=self.sync)
        es = ESGradient(cfg.es.sigma, cfg.es.num_samples, seed=Seeds.to_int(seeds.es)) \
            if needs.es_rows else None
        # Its own concurrency group answers the driver's liveness pings while
        # an iteration runs (OnRay.get_long).
        self.coordinator = p.make(
            Coordinator, {**central_opts, "role": "the coordinator",
                          "concurrency_groups": {"ping": 1}},
            solution_dim=spec.genome_dim, x0=initial_theta(cfg, spec, seeds),
            archive_dims=cfg.env.resolved_dims(), archive_ranges=cfg.env.resolved_ranges(),
            qd_offset=meta.qd_offset, algorithm=cfg.algorithm, evaluator=evaluator,
            learner=self.group, learner_rows=self.group.rows if self.group else None, es=es,
            td3_updates=cfg.td3.train_steps_per_iteration if self.sync else 0,
            seed=Seeds.to_int(seeds.coordinator), max_fitness=meta.max_fitness,
            robustness_every=cfg.metrics.robustness_every,
            robustness_episodes=cfg.metrics.robustness_episodes,
            policy_first_layer=spec.layers[0][2:],
        )

        self.replay_restarts, self._replay_incarnation = 0, None
        self.worker_restarts, self._worker_incarnations = 0, None

    @property
    def num_rollout_workers(self) -> int:
        return len(self.workers)

    def _get(self, handle, method: str, *args, group: str | None = None):
        return self.p.get(self.p.call(handle, method, *args, group=group))

    def start(self) -> None:
        """Async mode: learners train in the background from now on."""
        if not self.sync and self.learners:
            self.p.get([self.p.call(lr, "start_async", group="train") for lr in self.learners])

    def iteration(self) -> dict:
        p = self.p
        m = p.get_long(p.call(self.coordinator, "iteration"),
                       ping=lambda: p.call(self.coordinator, "heartbeat", group="ping"))
        if self.group is not None and not self.sync:
            m.update(loss_metrics(self.group.stats()))  # raises if training failed
        return m

    def state(self, save_replay: bool = True) -> dict:
        p = self.p
        futures = {
            "coordinator": p.call(self.coordinator, "state_dict"),
            "archive": p.call(self.coordinator, "archive_arrays"),
            "learners": [p.call(lr, "state_dict", group="grad") for lr in self.learners],
            "replay": p.call(self.replay, "state_dict") if save_replay else None,
        }
        return {k: None if v is None else p.get(v) for k, v in futures.items()}

    def load(self, state: dict) -> None:
        if len(state["learners"]) != len(self.learners):
            raise ValueError(f"checkpoint has {len(state['learners'])} learner states, this "
                             f"system has {len(self.learners)} learners (resources.num_learners)")
        p = self.p
        futures = [p.call(self.coordinator, "load_state_dict", state["coordinator"])]
        futures += [p.call(lr, "load_state_dict", s) for lr, s in zip(self.learners,
                                                                     state["learners"])]
        if state.get("replay") is not None:
            futures.append(p.call(self.replay, "load_state_dict", state["replay"]))
        p.get(futures)
        if self.learners:  # what a learner restarted from now on gets back
            self._get(self.coordinator, "snapshot_learners")

    def archive(self) -> dict:
        return self._get(self.coordinator, "archive_arrays")

    def system_stats(self) -> dict:
        workers = self.p.get([self.p.call(w, "stats") for w in self.workers])
        ids = [w["incarnation"] for w in workers]
        if self._worker_incarnations is not None:
            self.worker_restarts += sum(a != b for a, b in zip(self._worker_incarnations, ids))
        self._worker_incarnations = ids
        replay = self._get(self.replay, "stats")
        if self._replay_incarnation not in (None, replay["incarnation"]):
            self.replay_restarts += 1
            _warn(f"the replay buffer was restarted (its node died?); it reloaded "
                  f"{replay['restored_size'] or 0} transitions from the last checkpoint")
        self._replay_incarnation = replay["incarnation"]
        learners = self.group.stats() if self.group else {}
        out = {"worker_busy_s": float(sum(w["busy_s"] for w in workers)),
               "num_rollout_workers": len(self.workers),
               "replay_size": int(replay["size"]),
               "critic_updates": learners.get("updates", 0)}
        out["replay_restarts"] = self.replay_restarts
        out["worker_restarts"] = self.worker_restarts
        if learners:
            out["td3_lr"] = learners["lr"]  # the rate in effect (a PBT restore changes it)
        return out

    def stop_learners(self, timeout_s: float = 60.0) -> None:
        """Stops background training; gives up (with a warning) on learners that
        do not answer in ``timeout_s`` (never placed, or busy): they are killed next."""
        if not self.learners:
            return
        futures = [self.p.call(lr, "stop_async", group="grad") for lr in self.learners]
        if self.placement_name != "ray":
            return
        import ray

        done, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        ray.get(done)
        if pending:
            _warn(f"{len(pending)} of {len(futures)} learners did not stop within "
                  f"{timeout_s:g} s (never placed, or busy): killing them")

    def close(self) -> None:
        try:
            self.stop_learners()
        finally:
            for h in [self.coordinator, *self.workers, *self.learners, self.replay]:
                self.p.kill(h)


class EvaluationPool:
    """Rollout workers alone, without replay or learners: re-evaluating archives
    (robustness) on every CPU of the cluster, or in process.

    Args:
        cfg: The run's config (env, policy, episode length, envs per worker).
        placement: ``"ray"`` (Ray must be initialized) or ``"inprocess"``.
        num_workers: Workers (default: the config's, else one per free CPU).
    """

    def __init__(self, cfg: ExperimentConfig, placement: str = "ray",
                 num_workers: int | None = None):
        r = cfg.resources
        self.p = p = make_placement(placement, r)
        n = num_workers or r.num_rollout_workers
        if not n:
            if placement == "ray":
                import ray

                free = ray.available_resources().get("CPU", 1.0)
                n = max(1, int(free // max(r.cpus_per_worker, 1e-9)))
            else:
                n = 1
        spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        opts = {"num_cpus": r.cpus_per_worker, "max_restarts": -1, "max_task_retries": -1}
        self.workers = [p.make(RolloutWorker, {**opts, "role": f"rollout worker {i}"},
                               cfg.env.id, spec, num_envs=r.envs_per_worker,
                               episode_length=cfg.env.episode_length)
                        for i in range(n)]
        self.evaluator = PooledEvaluator(p, self.workers, None,
                                         chunk=max(1, min(r.envs_per_worker, 8)))

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray, record: bool = False) -> dict:
        if record:
            raise ValueError("an EvaluationPool has no replay buffer to record into")
        return self.evaluator.evaluate(genomes, seeds, record=False)

    def close(self) -> None:
        for w in self.workers:
            self.p.kill(w)


def build(cfg: ExperimentConfig, placement: str = "ray",
          torch_threads: int | None = None, run_dir=None) -> System:
    """Builds every role of a run on ``placement`` (``"inprocess"`` or ``"ray"``)."""
    return System(cfg, placement, torch_threads=torch_threads, run_dir=run_dir)


__all__ = ["EvaluationPool", "Evaluator", "GPUUnavailableError", "GradientSource", "InProcess",
           "LearnerGroup", "OnRay", "PooledEvaluator", "ReplaySampler", "ReplaySink",
           "ResourceError", "Saveable", "Seeds", "System", "build", "resolve_resources"]
