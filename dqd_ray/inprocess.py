"""The whole CMA-MEGA loop in one process: for debugging and for tests.

Builds the same roles the Ray graph builds (rollout worker, replay buffer,
learner, coordinator) as plain objects, wired directly. In async learner mode
the learner trains in a background thread of this process, as the learner
actor does under Ray.
"""

from __future__ import annotations

import numpy as np

from dqd_ray.config import ExperimentConfig
from dqd_ray.coordinator import Coordinator
from dqd_ray.envs import env_metadata
from dqd_ray.es_gradients import ESGradient
from dqd_ray.learner import Learner, loss_metrics, pick_device
from dqd_ray.policy import PolicySpec
from dqd_ray.replay import ReplayBuffer
from dqd_ray.rollout import RolloutWorker


class Seeds:
    """All seeds of a run, spawned from the root seed."""

    def __init__(self, root: int):
        ss = np.random.SeedSequence(root)
        (self.coordinator, self.policy, self.replay, self.learners,
         self.es, self.workers) = ss.spawn(6)

    @staticmethod
    def to_int(ss: np.random.SeedSequence) -> int:
        return int(ss.generate_state(1)[0])


def learner_objectives(cfg: ExperimentConfig) -> list[int]:
    """Objectives whose gradients come from TD3 critics."""
    k = env_metadata(cfg.env.id).measure_dim
    if cfg.algorithm.gradients == "td3":
        return list(range(1 + k))
    if cfg.algorithm.gradients == "td3_es":
        return [0]
    return []


def split_objectives(objectives: list[int], num_learners: int) -> list[list[int]]:
    """Splits the critics between learners as evenly as possible (none empty)."""
    n = max(1, min(num_learners, len(objectives)))
    return [[int(o) for o in part] for part in np.array_split(objectives, n)]


def initial_theta(cfg: ExperimentConfig, spec: PolicySpec, seeds: Seeds) -> np.ndarray:
    if cfg.algorithm.x0_from_policy_init:
        return spec.init_genome(np.random.default_rng(seeds.policy))
    return np.zeros(spec.genome_dim, np.float32)


class WorkerEvaluator:
    """Evaluator over one in-process rollout worker.

    In keyed mode transitions are staged per genome and committed in genome
    order after each call, exactly as the Ray evaluator does in sync mode.
    """

    def __init__(self, worker: RolloutWorker, replay: ReplayBuffer | None = None,
                 keyed: bool = False):
        self.worker, self.replay, self.keyed = worker, replay, keyed
        self.calls = 0

    def evaluate(self, genomes, seeds):
        call = self.calls
        self.calls += 1
        keys = [(call, i) for i in range(len(genomes))] if self.keyed else None
        out = self.worker.evaluate(genomes, seeds, keys=keys)
        if self.keyed and self.replay is not None:
            self.replay.commit()
        return out


class InProcessSystem:
    """Every role of a run as a plain object in this process."""

    def __init__(self, cfg: ExperimentConfig, torch_threads: int | None = None):
        self.cfg = cfg
        meta = env_metadata(cfg.env.id)
        seeds = Seeds(cfg.seed)
        self.spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        self.replay = ReplayBuffer(meta.obs_dim, meta.act_dim, 1 + meta.measure_dim,
                                   cfg.td3.replay_capacity, seed=Seeds.to_int(seeds.replay))
        self.worker = RolloutWorker(cfg.env.id, self.spec, num_envs=cfg.resources.envs_per_worker,
                                    episode_length=cfg.env.episode_length,
                                    chunk_size=cfg.resources.chunk_size, sink=self.replay.add)
        objectives = learner_objectives(cfg)
        self.learner = None
        if objectives:
            self.learner = Learner(self.spec, 1 + meta.measure_dim, cfg.td3, self.replay,
                                   device=pick_device(cfg.resources.num_gpus_per_learner),
                                   seed=Seeds.to_int(seeds.learners),
                                   objectives=objectives, torch_threads=torch_threads)
        self.sync = cfg.resources.learner_mode == "sync"
        es = None
        if cfg.uses_es:
            es = ESGradient(cfg.es.sigma, cfg.es.num_samples, seed=Seeds.to_int(seeds.es))
        self.coordinator = Coordinator(
            solution_dim=self.spec.genome_dim, x0=initial_theta(cfg, self.spec, seeds),
            archive_dims=cfg.env.resolved_dims(), archive_ranges=cfg.env.resolved_ranges(),
            qd_offset=meta.qd_offset, algorithm=cfg.algorithm,
            evaluator=WorkerEvaluator(self.worker, self.replay, keyed=True),
            learner=self.learner,
            learner_rows=objectives if self.learner else None, es=es,
            td3_updates=cfg.td3.train_steps_per_iteration if self.sync else 0,
            seed=Seeds.to_int(seeds.coordinator),
        )

    def iteration(self) -> dict:
        m = self.coordinator.iteration()
        if self.learner is not None and not self.sync:
            m.update(loss_metrics(self.learner.stats()))  # raises if training failed
        return m

    def close(self) -> None:
        try:
            if self.learner is not None:
                self.learner.stop_async()
        finally:
            self.worker.close()

    # -- the interface the runner uses (shared with graph.RaySystem) -----------

    def state(self, save_replay: bool = True) -> dict:
        return {
            "coordinator": self.coordinator.state_dict(),
            "archive": self.coordinator.archive_arrays(),
            "learners": [self.learner.state_dict()] if self.learner else [],
            "replay": self.replay.state_dict() if save_replay else None,
        }

    def load(self, state: dict) -> None:
        self.coordinator.load_state_dict(state["coordinator"])
        if self.learner is not None:
            if len(state["learners"]) != 1:
                raise ValueError(f"checkpoint has {len(state['learners'])} learner states, "
                                 "the in-process run has 1")
            self.learner.load_state_dict(state["learners"][0])
        if state.get("replay") is not None:
            self.replay.load_state_dict(state["replay"])

    def archive(self) -> dict:
        return self.coordinator.archive_arrays()

    def system_stats(self) -> dict:
        learner = self.learner.stats() if self.learner else {}
        return {"critic_updates": learner.get("updates", 0),
                "worker_busy_s": self.worker.busy_s, "num_rollout_workers": 1,
                "replay_size": len(self.replay)}

    def start(self) -> None:
        """Async mode: the learner trains in a background thread from now on."""
        if self.learner is not None and not self.sync:
            self.learner.start_async()
