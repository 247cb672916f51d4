"""PGA-MAP-Elites (Nilsson & Cully 2021): iso-line variation plus policy-gradient
variation of elites up a TD3 fitness critic, whose greedy actor joins each batch."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from ribs.emitters import EmitterBase, IsoLineEmitter

from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, MaskedScheduler, Needs
from dqd_ray.presets import PAPER, merge


class PGAMEConfig(AlgorithmSettings):
    """PGA-MAP-Elites: iso-line variation plus policy-gradient variation from a TD3 critic."""

    name: Literal["pga_me"] = "pga_me"
    iso_sigma: float = Field(0.005, gt=0, description="Iso-line emitter's isotropic noise.")
    line_sigma: float = Field(0.05, ge=0, description="Iso-line emitter's line noise.")
    iso_batch_size: int = Field(50, gt=0, description="Iso-line solutions per iteration.")
    pg_batch_size: int = Field(
        50, ge=2, description="Policy-gradient emitter's solutions per iteration: the greedy "
        "actor plus pg_batch_size-1 varied elites."
    )
    pg_steps: int = Field(10, gt=0, description="Adam steps up the fitness critic per variant.")
    pg_lr: float = Field(0.001, gt=0, description="Adam learning rate of the PG variation.")
    pg_states: int = Field(256, gt=0, description="Fresh buffer states per PG step.")
    init_sigma: float = Field(
        0.02, gt=0, description="While the archive is empty: x0 + N(0, init_sigma^2)."
    )


Config = PGAMEConfig


class PolicyGradientEmitter(EmitterBase):
    """Asks for the greedy actor and ``batch_size - 1`` PG-varied random elites.

    The emitter only chooses the parents: after :meth:`ask`, :attr:`greedy_rows`
    and :attr:`vary_rows` say which rows of its batch the coordinator replaces
    with the learner's greedy actor and with PG variants of the parents. While
    the archive is empty it returns ``x0 + N(0, init_sigma^2)`` and asks for
    nothing.
    """

    def __init__(self, archive, x0, init_sigma: float, batch_size: int, seed: int | None = None):
        x0 = np.asarray(x0, archive.dtypes["solution"])
        EmitterBase.__init__(self, archive, solution_dim=len(x0), bounds=None,
                             lower_bounds=None, upper_bounds=None)
        self._rng = np.random.default_rng(seed)
        self._x0 = x0
        self._init_sigma = float(init_sigma)
        self._batch_size = int(batch_size)
        self.greedy_rows = np.zeros(0, np.int64)
        self.vary_rows = np.zeros(0, np.int64)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def ask(self) -> np.ndarray:
        n, d = self._batch_size, self.solution_dim
        if self.archive.empty:
            self.greedy_rows = np.zeros(0, np.int64)
            self.vary_rows = np.zeros(0, np.int64)
            noise = self._rng.normal(scale=self._init_sigma, size=(n, d))
            return (self._x0[None] + noise).astype(self.archive.dtypes["solution"])
        parents = self.archive.sample_elites(n - 1)["solution"]
        self.greedy_rows = np.array([0])
        self.vary_rows = np.arange(1, n)
        return np.concatenate([self._x0[None], parents]).astype(self.archive.dtypes["solution"])


def needs(cfg, measure_dim: int) -> Needs:
    return Needs(critic_objectives=(0,), pg_variation=True, critic_updates=True)


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    return cfg.algorithm.iso_batch_size + cfg.algorithm.pg_batch_size


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    archive_seed, iso_seed, pg_seed = ctx.seeds(3)
    archive = ctx.archive(archive_seed)
    iso = IsoLineEmitter(archive, iso_sigma=cfg.iso_sigma, line_sigma=cfg.line_sigma,
                         x0=ctx.x0, batch_size=cfg.iso_batch_size, seed=iso_seed)
    pg = PolicyGradientEmitter(archive, ctx.x0, cfg.init_sigma, cfg.pg_batch_size, seed=pg_seed)
    return MaskedScheduler(archive, [iso, pg])


STATE_CLASSES = (PolicyGradientEmitter, IsoLineEmitter)
PRESETS = {"pga_me": merge(PAPER, {
    "iterations": 10000,
    "algorithm": {"name": "pga_me", "iso_sigma": 0.005, "line_sigma": 0.05,
                  "iso_batch_size": 50, "pg_batch_size": 50, "pg_steps": 10,
                  "pg_lr": 0.001, "pg_states": 256, "init_sigma": 0.02},
    "td3": {"train_steps_per_iteration": 300},
})}
PAPER_PRESETS = ("pga_me",)
