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
learners), replay sampler and sink, saveable. :class:`StagedTraining` is
what a gradient source hands back for an iteration's critic updates; it lives
here, free of torch, because the coordinator holds it and never imports torch.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

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
    def stage_training(self, num_updates: int) -> StagedTraining: ...
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


class StagedTraining:
    """Critic updates whose batches are drawn: ``start()``, then ``wait()``.

    In process the updates run inside ``wait()``; the Ray learner group
    starts them on the learner actors in ``start()``. The numbers are the
    same either way, since the batches were fixed when staging. On Ray the
    batches may still be being drawn when this returns: ``drawn()`` waits
    until they are, and must come before the replay buffer takes any new
    experience (the evaluator calls it before its next commit).
    """

    def __init__(self, run: Callable[[], dict], start: Callable[[], None] | None = None,
                 drawn: Callable[[], None] | None = None):
        self._run, self._start, self._drawn = run, start, drawn

    def start(self) -> None:
        if self._start is not None:
            self._start()

    def drawn(self) -> None:
        if self._drawn is not None:
            drawn, self._drawn = self._drawn, None
            drawn()

    def wait(self) -> dict:
        self.drawn()
        return self._run()
