"""MAP-Elites with Gaussian variation (as the paper's baseline configures it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler
from dqd_ray.presets import PAPER, merge


class MapElitesConfig(AlgorithmSettings):
    """MAP-Elites with Gaussian variation."""

    name: Literal["map_elites"] = "map_elites"
    sigma: float = Field(0.02, gt=0, description="Gaussian mutation std (and around x0 at start).")
    batch_size: int = Field(100, gt=0, description="Solutions per iteration.")


Config = MapElitesConfig


def needs(cfg, measure_dim: int) -> Needs:
    return Needs()  # no gradients, no critics, no learner


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    return cfg.algorithm.batch_size


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from ribs.emitters import GaussianEmitter

    from dqd_ray.algorithms.scheduler import MaskedScheduler

    archive_seed, emitter_seed = ctx.seeds(2)
    archive = ctx.archive(archive_seed)
    # An empty archive: x0 + N(0, sigma^2); afterwards an elite + N(0, sigma^2).
    emitter = GaussianEmitter(archive, sigma=cfg.sigma, x0=ctx.x0, batch_size=cfg.batch_size,
                              seed=emitter_seed)
    return MaskedScheduler(archive, [emitter])


def state_classes() -> tuple[tuple, dict]:
    from ribs.emitters import GaussianEmitter

    return (GaussianEmitter,), {}


PRESETS = {"map_elites": merge(PAPER, {
    "iterations": 10000,
    "algorithm": {"name": "map_elites", "sigma": 0.02, "batch_size": 100},
})}
PAPER_PRESETS = ("map_elites",)
