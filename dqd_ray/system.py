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
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dqd_ray.config import ExperimentConfig
from dqd_ray.coordinator import Coordinator
from dqd_ray.envs import env_metadata
from dqd_ray.es_gradients import ESGradient
from dqd_ray.learner import Learner, StagedTraining, loss_metrics
from dqd_ray.policy import PolicySpec
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



from dqd_ray.replay_actor import (  # noqa: E402,F401 - re-exported
    ReplayActor, ReplayActorSampler, ReplaySink, _Future, _reconstructed, _resolve)
from dqd_ray.runtime.evaluator import PooledEvaluator  # noqa: E402
from dqd_ray.runtime.learners import LearnerGroup, _merge_losses  # noqa: E402,F401
from dqd_ray.runtime.placement import (  # noqa: E402,F401
    PLACEMENTS, InProcess, OnRay, make_placement)
from dqd_ray.runtime.resources import (  # noqa: E402,F401
    RAY_ONLY_RESOURCES, GPUUnavailableError, ResourceError, Seeds, _homeless, _warn,
    _warn_ray_only_fields, actor_bundles, algorithm_needs, evaluations_per_iteration,
    graph_bundles, graph_needs, initial_theta, learner_objectives, resolve_resources,
    split_objectives)


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
