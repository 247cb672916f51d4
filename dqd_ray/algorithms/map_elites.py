"""MAP-Elites with Gaussian variation (as the paper's baseline configures it)."""

from __future__ import annotations

from ribs.emitters import GaussianEmitter

from dqd_ray.algorithms.base import BuildContext, MaskedScheduler, Needs


def needs(cfg, measure_dim: int) -> Needs:
    return Needs()  # no gradients, no critics, no learner


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    archive_seed, emitter_seed = ctx.seeds(2)
    archive = ctx.archive(archive_seed)
    # An empty archive: x0 + N(0, sigma^2); afterwards an elite + N(0, sigma^2).
    emitter = GaussianEmitter(archive, sigma=cfg.sigma, x0=ctx.x0, batch_size=cfg.batch_size,
                              seed=emitter_seed)
    return MaskedScheduler(archive, [emitter])
