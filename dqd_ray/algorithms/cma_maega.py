"""CMA-MAEGA: CMA-MEGA over an archive with a learning rate (soft thresholds,
Fontaine & Nikolaidis 2023); results are kept in a separate plain archive."""

from __future__ import annotations

from dqd_ray.algorithms import cma_mega
from dqd_ray.algorithms.base import BuildContext, MaskedScheduler

needs = cma_mega.needs


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    archive_seed, result_seed, *emitter_seeds = ctx.seeds(2 + cfg.num_emitters)
    tmin = ctx.qd_offset if cfg.threshold_min is None else cfg.threshold_min
    archive = ctx.archive(archive_seed, learning_rate=cfg.archive_learning_rate,
                          threshold_min=tmin)
    result = ctx.archive(result_seed)
    return MaskedScheduler(archive, cma_mega.emitters(cfg, archive, ctx, emitter_seeds),
                           result_archive=result)
