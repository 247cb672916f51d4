"""The one builder of a run's system: every role, created from one config
through a *placement* (:mod:`dqd_ray.runtime.placement`):

- :class:`~dqd_ray.runtime.placement.InProcess`: plain objects in this process
  (debugging, tests);
- :class:`~dqd_ray.runtime.placement.OnRay`: actors,
  ``ray.remote(**options)(cls).remote(...)``.

The wiring (who evaluates on which workers, which learner owns which
critics, where transitions go) is written once, over the placement's
``make``/``call``/``get``, the way RLlib builds local and remote env runners
from one code path; what differs between the placements lives in them. Both
honour every ``resources`` field; where the in-process one must differ it
says so in a warning. The roles' interfaces are in :mod:`dqd_ray.roles`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from dqd_ray.config import ExperimentConfig
from dqd_ray.envs import env_metadata
from dqd_ray.roles.coordinator import Coordinator
from dqd_ray.roles.es_gradients import ESGradient
from dqd_ray.roles.learner import Learner, learner_threads, loss_metrics
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.replay_actor import ReplayActor
from dqd_ray.roles.rollout import RolloutWorker
from dqd_ray.runtime.evaluator import PooledEvaluator
from dqd_ray.runtime.learners import LearnerGroup
from dqd_ray.runtime.placement import make_placement
from dqd_ray.runtime.resources import (
    Seeds,
    _warn,
    algorithm_needs,
    initial_theta,
    learner_cpus,
    split_objectives,
)


class System:
    """Every role of one run, built from its config on a placement.

    Args:
        cfg: The validated config.
        placement: ``"inprocess"`` or ``"ray"`` (Ray must be initialized).
        torch_threads: Torch intra-op threads per learner (default: config, else
            a CPU learner's CPUs, see ``resources.torch_threads``).
        run_dir: The run directory, if any: a restarted replay actor reloads
            the replay data of its newest checkpoint.
    """

    def __init__(self, cfg: ExperimentConfig, placement: str = "ray",
                 torch_threads: int | None = None, run_dir=None):
        self.cfg = cfg
        r = cfg.resources
        self.p = p = make_placement(placement, r)
        torch_threads = torch_threads or r.torch_threads
        meta = env_metadata(cfg.env.id)
        seeds = Seeds(cfg.seed)
        self.spec = spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        needs = algorithm_needs(cfg)
        n_workers, gpus = p.resolve(cfg)
        self.sync = r.learner_mode == "sync"

        worker_opts = p.restartable({"num_cpus": r.cpus_per_worker})
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
        # Restartable; workers and learners find it by name (see ReplaySink). A
        # restarted one reloads the replay data of the run's newest checkpoint.
        replay_name = f"dqd-ray-replay-{uuid.uuid4().hex[:12]}"
        replay_opts = p.restartable(replay_opts, name=replay_name)
        replay_kw = {}
        if p.restarts and run_dir is not None:
            replay_kw["checkpoints"] = str(Path(run_dir).resolve() / "checkpoints")
        self.replay = p.make(ReplayActor, {**replay_opts, "role": "the replay buffer",
                                           "concurrency_groups": {"ckpt": 1}},
                             meta.obs_dim, meta.act_dim,
                             1 + meta.measure_dim, cfg.td3.replay_capacity,
                             seed=Seeds.to_int(seeds.replay), **replay_kw)
        p.named(self.replay, replay_name)
        self.workers = [
            p.make(RolloutWorker, {**worker_opts, "role": f"rollout worker {i}"}, cfg.env.id,
                   spec, num_envs=r.envs_per_worker, episode_length=cfg.env.episode_length,
                   chunk_size=r.chunk_size, sink=p.sink(self.replay),
                   time_limit_done=cfg.td3.time_limit_done)
            for i in range(n_workers)
        ]
        self.splits = split_objectives(list(needs.critic_objectives), r.num_learners) \
            if needs.critic_objectives else []
        device = "auto" if gpus > 0 else "cpu"
        # Restartable: the coordinator's LearnerGroup restores a restarted one.
        learner_opts = p.restartable({"num_cpus": learner_cpus(cfg, gpus),
                                      "num_gpus": gpus,
                                      "concurrency_groups": {"train": 1, "grad": 1}})
        if r.learner_resource:
            learner_opts["resources"] = {r.learner_resource: 1}
        # A CPU learner's torch threads follow the CPUs it asks for (one if it
        # shares a core); resources.torch_threads or the argument wins.
        threads = torch_threads or (None if gpus > 0 else
                                    learner_threads(learner_opts["num_cpus"]))
        self.learners = [
            p.make(Learner, {**learner_opts, "role": f"learner {i} (objectives {objs})"}, spec,
                   1 + meta.measure_dim, cfg.td3, p.sampler(self.replay), device=device,
                   seed=Seeds.to_int(seeds.learners), objectives=objs,
                   torch_threads=threads)
            for i, objs in enumerate(self.splits)
        ]
        self.learner_device = "cuda" if gpus > 0 else "cpu"
        self.group = LearnerGroup(
            p, self.learners, self.splits, async_train=not self.sync,
            snapshot_every=cfg.checkpoint.learner_snapshot_every if p.restarts else 0,
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
                          "concurrency_groups": {"ping": 1, "ckpt": 1}},
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

    def capture(self, save_replay: bool = True) -> Callable[[], dict]:
        """Captures the run's state now (milliseconds: each role keeps a copy of
        its own, the big arrays copied while the next iteration runs) and
        returns ``collect``, which gathers it into :meth:`state`'s dict: call it
        once, from the checkpoint writer's thread.

        The roles answer ``collect`` from their own concurrency groups
        (``ckpt`` for the coordinator and the replay buffer, ``grad`` for
        the learners), so it never waits behind an iteration.
        """
        p = self.p
        acks = [p.call(self.coordinator, "capture_state")]
        acks += [p.call(lr, "capture_state", group="grad") for lr in self.learners]
        if save_replay:
            acks.append(p.call(self.replay, "capture_state"))
        p.get(acks)  # done before the next iteration changes anything

        def collect() -> dict:
            futures = {
                "coordinator": p.call(self.coordinator, "captured_state", group="ckpt"),
                "learners": [p.call(lr, "captured_state", group="grad")
                             for lr in self.learners],
                "replay": p.call(self.replay, "captured_state", group="ckpt")
                if save_replay else None,
            }
            try:
                got = {k: None if v is None else p.get(v) for k, v in futures.items()}
            except Exception as err:  # noqa: BLE001 - a role restarted: its copy is gone
                from dqd_ray.state.writer import CaptureLost

                what = " ".join(str(err).split())[-300:] or type(err).__name__
                raise CaptureLost(f"a role did not hand over its captured state "
                                  f"(restarted since the capture?): {what}") from err
            coord = got.pop("coordinator")
            return {"coordinator": coord["coordinator"], "archive": coord["archive"], **got}

        return collect

    def state(self, save_replay: bool = True) -> dict:
        """The run's state: :meth:`capture`, collected at once."""
        return self.capture(save_replay)()

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
               "worker_cpu_s": float(sum(w.get("cpu_s", 0.0) for w in workers)),
               "num_rollout_workers": len(self.workers),
               "rollout_workers_compiled": sum(bool(w.get("compiled")) for w in workers),
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
        pending = self.p.wait_all(futures, timeout_s)
        if pending:
            _warn(f"{pending} of {len(futures)} learners did not stop within "
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
            free = p.free_cpus()
            n = 1 if free is None else max(1, int(free // max(r.cpus_per_worker, 1e-9)))
        spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        opts = p.restartable({"num_cpus": r.cpus_per_worker})
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
