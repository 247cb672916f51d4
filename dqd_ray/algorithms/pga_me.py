"""PGA-MAP-Elites (Nilsson & Cully 2021): iso-line variation plus policy-gradient
variation of elites up a TD3 fitness critic, whose greedy actor joins each batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs
from dqd_ray.presets import PAPER, merge
from dqd_ray.state import statecodec

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler


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


def needs(cfg, measure_dim: int) -> Needs:
    return Needs(critic_objectives=(0,), pg_variation=True, critic_updates=True)


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    return cfg.algorithm.iso_batch_size + cfg.algorithm.pg_batch_size


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from ribs.emitters import IsoLineEmitter

    from dqd_ray.algorithms.pga_me_emitter import PolicyGradientEmitter
    from dqd_ray.algorithms.scheduler import MaskedScheduler

    archive_seed, iso_seed, pg_seed = ctx.seeds(3)
    archive = ctx.archive(archive_seed)
    iso = IsoLineEmitter(archive, iso_sigma=cfg.iso_sigma, line_sigma=cfg.line_sigma,
                         x0=ctx.x0, batch_size=cfg.iso_batch_size, seed=iso_seed)
    pg = PolicyGradientEmitter(archive, ctx.x0, cfg.init_sigma, cfg.pg_batch_size, seed=pg_seed)
    return MaskedScheduler(archive, [iso, pg])


def state_classes() -> tuple[tuple, dict]:
    from ribs.emitters import IsoLineEmitter

    from dqd_ray.algorithms.pga_me_emitter import PolicyGradientEmitter

    # Checkpoints written before the emitter moved to its own module name it here.
    statecodec.allow_old_name("dqd_ray.algorithms.pga_me.PolicyGradientEmitter",
                              PolicyGradientEmitter)
    return (PolicyGradientEmitter, IsoLineEmitter), {}


PRESETS = {"pga_me": merge(PAPER, {
    "iterations": 10000,
    "algorithm": {"name": "pga_me", "iso_sigma": 0.005, "line_sigma": 0.05,
                  "iso_batch_size": 50, "pg_batch_size": 50, "pg_steps": 10,
                  "pg_lr": 0.001, "pg_states": 256, "init_sigma": 0.02},
    "td3": {"train_steps_per_iteration": 300},
})}
PAPER_PRESETS = ("pga_me",)
