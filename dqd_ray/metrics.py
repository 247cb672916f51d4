"""The names of the metrics a run reports, declared once.

The coordinator reports its counters, the result archive's statistics and the
time of each phase of its iteration (:class:`PhaseTimer`); the loop adds
throughput and the system's state. :func:`reported_metrics` says which names
every iteration of a run carries: what a Tune sweep may optimize.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

COUNTERS = ("iteration", "evaluations", "env_steps", "invalid", "nonfinite_gradients",
            "greedy_inserted", "critic_updates", "robustness_evaluations")
"""The coordinator's cumulative counters (checkpointed)."""

ARCHIVE = ("qd_score", "qd_score_per_cell", "norm_qd_score", "coverage", "num_elites",
           "best_fitness", "mean_fitness", "worst_fitness", "restarts", "robustness")
"""The result archive's statistics, emitter restarts and robustness of the best elite."""

PHASES = ("rollout_s", "gradient_s", "train_s", "phase_theta_es_s", "phase_jacobian_s",
          "phase_batch_s", "phase_robustness_s")
"""Seconds of an iteration, reported every iteration (0 where a phase did not run):
``rollout_s`` / ``gradient_s`` / ``train_s`` are the coarse split (``train_s`` is the
wait for the critic updates after the batch); ``phase_*`` the phases of the paper's
iteration (``phase_theta_es_s`` is the first half: theta's ES samples, theta itself
being evaluated with its branches in ``phase_batch_s``). Reported only where they
ran: ``phase_stage_s``, ``phase_learner_checks_s`` and ``critic_train_s`` (the
learners' own training time)."""

ITERATION = ("mean_evaluation", "iteration_evaluations", "iteration_env_steps", "iteration_s")
"""What this iteration evaluated, and its wall time inside the coordinator."""

LOOP = ("wall_s", "env_steps_per_s", "evaluations_per_s", "critic_updates_per_s",
        "critic_updates_total", "time_rollout_s", "time_gradient_s", "time_train_s",
        "time_coordinator_s", "worker_idle_frac", "replay_size", "worker_restarts",
        "replay_restarts", "checkpoint_capture_s", "checkpoint_write_s",
        "rollout_workers_compiled")
"""What the loop adds: throughput, the time split, the system's state and what
checkpoints cost: ``checkpoint_capture_s`` (capturing this iteration's state:
each role keeps a copy of its own, gathered in the background; 0 where none was
taken) and ``checkpoint_write_s`` (the newest background write that ended, the
gathering included); ``rollout_workers_compiled``: the rollout workers whose
envs step in C (docs/environments.md)."""

CORE = frozenset(COUNTERS + ARCHIVE + PHASES + ITERATION + LOOP)
"""Every iteration of every run reports these."""

DQD = ("grad_norm_fitness", "grad_norm_measures")
CRITICS = ("td3_lr", "learner_restarts")
GREEDY = ("greedy_fitness",)


def reported_metrics(needs) -> frozenset:
    """Every metric name each iteration reports for an algorithm's ``Needs``."""
    extra: set[str] = set()
    if needs.dqd:
        extra.update(DQD)
    if needs.critic_objectives:
        extra.update(CRITICS)
    if needs.greedy_insert:  # (PGA-ME's greedy row waits for trained critics)
        extra.update(GREEDY)
    return CORE | extra


class PhaseTimer:
    """Seconds per phase of one iteration: ``with timer("rollout_s", "phase_batch_s"):``
    adds the block's time to each name. Names of :data:`PHASES` start at 0."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, *names: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            for name in names:
                self.seconds[name] = self.seconds.get(name, 0.0) + dt

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
