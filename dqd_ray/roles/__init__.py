"""The roles of a run and their interfaces.

Every role is a plain class, placed in process or as a Ray actor by
:mod:`dqd_ray.runtime`:

- :class:`~dqd_ray.roles.rollout.RolloutWorker` (``rollout.py``): steps its
  envs with the genomes it is given and streams transitions to the replay buffer;
- :class:`~dqd_ray.roles.replay_actor.ReplayActor` (``replay_actor.py``, over
  ``replay.py``): the shared replay buffer;
- :class:`~dqd_ray.roles.learner.Learner` (``learner.py``, over ``td3.py``):
  the TD3 critics of some objectives, their jacobians and greedy actors;
- :class:`~dqd_ray.roles.coordinator.Coordinator` (``coordinator.py``): the
  archive and emitters; where an iteration happens.

``policy.py`` is the genome-to-policy map every role shares, ``es_gradients.py``
the evolution-strategies gradient estimate.

Interfaces (duck-typed, the Protocols below): evaluator, gradient source (the
learners), replay sampler and sink, saveable.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Evaluator(Protocol):
    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray, record: bool = True,
                 **options) -> dict:
        """``{"fitness", "measures", "length", "valid", "env_steps"}`` of one
        episode per genome, each with its seed."""


class GradientSource(Protocol):
    def jacobian(self, genomes: np.ndarray) -> np.ndarray: ...
    def greedy_genome(self) -> np.ndarray: ...
    def pg_variation(self, genomes: np.ndarray, steps: int, lr: float,
                     num_states: int) -> np.ndarray: ...
    def stage_training(self, num_updates: int) -> Any: ...  # a learner.StagedTraining
    def stats(self) -> dict: ...


class ReplaySampler(Protocol):
    def size(self) -> int: ...
    def sample(self, batch_size: int, num_batches: int, seed: int | None = None) -> dict: ...
    def sample_states(self, n: int, seed: int | None = None) -> np.ndarray: ...


class ReplaySink(Protocol):
    def __call__(self, chunk: dict, key=None) -> None: ...


class Saveable(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...
