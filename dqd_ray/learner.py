"""Learner: owns a TD3 ensemble on its device and answers gradient requests.

The learner pulls training batches and gradient states from a sampler (the
in-process replay buffer, or an adapter over the replay actor) with
``size()``, ``sample(batch_size, num_batches)`` and ``sample_states(n)``.
"""

from __future__ import annotations

import numpy as np
import torch

from dqd_ray.policy import PolicySpec
from dqd_ray.td3 import TD3Ensemble


def pick_device(requested_gpus: float = 0.0) -> str:
    """``cuda`` when a GPU was requested (or assigned) and is visible, else ``cpu``."""
    return "cuda" if requested_gpus > 0 and torch.cuda.is_available() else "cpu"


class Learner:
    """TD3 critics for some objectives, trained from a sampler.

    Args:
        policy_spec: Policy architecture (actors mirror it).
        num_objectives: 1 + number of measures.
        td3_cfg: :class:`dqd_ray.config.TD3Config`.
        sampler: Replay sampler (see module docstring).
        device: Torch device.
        seed: Initialization seed.
        objectives: Objectives owned by this learner (default: all).
    """

    def __init__(self, policy_spec: PolicySpec, num_objectives: int, td3_cfg, sampler=None, *,
                 device: str = "cpu", seed: int = 0, objectives: list[int] | None = None):
        self.cfg = td3_cfg
        self.sampler = sampler
        self.ensemble = TD3Ensemble(policy_spec, num_objectives, td3_cfg, device=device,
                                    seed=seed, objectives=objectives)
        self.objectives = self.ensemble.objectives
        self.device = device
        self.last_losses: dict = {}

    def set_sampler(self, sampler) -> None:
        self.sampler = sampler

    def ready(self) -> bool:
        return self.sampler is not None and self.sampler.size() >= max(1, self.cfg.learning_starts)

    def train(self, num_updates: int) -> dict:
        if num_updates <= 0 or not self.ready():
            return {"updates": 0}
        batches = self.sampler.sample(self.cfg.batch_size, num_updates)
        return self.train_on(batches)

    def train_on(self, batches: dict) -> dict:
        out = self.ensemble.train(batches)
        self.last_losses = out
        return out

    def jacobian(self, genomes: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
        if states is None:
            if self.sampler is None or self.sampler.size() == 0:
                raise RuntimeError("jacobian needs states: the replay buffer is empty")
            states = self.sampler.sample_states(self.cfg.jacobian_states)
        return self.ensemble.jacobian(np.asarray(genomes, np.float32), states)

    def greedy_genome(self) -> np.ndarray:
        if 0 not in self.objectives:
            raise RuntimeError("this learner does not own the fitness agent")
        return self.ensemble.greedy_genome(self.objectives.index(0))

    def state_dict(self) -> dict:
        return self.ensemble.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ensemble.load_state_dict(state)
