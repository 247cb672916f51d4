"""CMA-MAEGA: CMA-MEGA over an archive with a learning rate (soft thresholds,
Fontaine & Nikolaidis 2023); results are kept in a separate plain archive."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from dqd_ray.algorithms import cma_mega
from dqd_ray.algorithms.base import BuildContext
from dqd_ray.presets import merge

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler


class CMAMAEGAConfig(cma_mega.CMAMEGAConfig):
    """CMA-MAEGA: CMA-MEGA with an archive learning rate (soft thresholds)."""

    name: Literal["cma_maega"] = "cma_maega"
    archive_learning_rate: float = Field(0.01, gt=0, le=1, description="Archive learning rate.")
    threshold_min: float | None = Field(
        None, description="Minimum cell threshold; default: the env's QD-score offset."
    )


Config = CMAMAEGAConfig
needs = cma_mega.needs
first_half_evaluations = cma_mega.first_half_evaluations
evaluations_per_iteration = cma_mega.evaluations_per_iteration


def annealed_archives(cfg, ctx: BuildContext):
    """The annealed archive (``archive_learning_rate``, empty cells at
    ``threshold_min``, default the env's QD offset), the result archive and the
    emitters' seeds: ``(archive, result, emitter_seeds)``."""
    archive_seed, result_seed, *emitter_seeds = ctx.seeds(2 + cfg.num_emitters)
    tmin = ctx.qd_offset if cfg.threshold_min is None else cfg.threshold_min
    archive = ctx.archive(archive_seed, learning_rate=cfg.archive_learning_rate,
                          threshold_min=tmin)
    return archive, ctx.archive(result_seed), emitter_seeds


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from dqd_ray.algorithms.scheduler import MaskedScheduler

    archive, result, emitter_seeds = annealed_archives(cfg, ctx)
    return MaskedScheduler(archive, cma_mega.emitters(cfg, archive, ctx, emitter_seeds),
                           result_archive=result)


state_classes = cma_mega.state_classes
PRESETS = {
    # Our own variants: all-TD3 gradients; and the paper's CMA-MEGA (TD3, ES) settings
    # over the annealed archive of the MAE presets (learning rate 0.001, empty cells
    # at the env's QD offset).
    "cma_maega_td3": {"algorithm": {"name": "cma_maega", "gradients": "td3"}},
    "cma_maega_td3_es": merge(cma_mega.PRESETS["cma_mega_td3_es"], {"algorithm": {
        "name": "cma_maega", "archive_learning_rate": 0.001, "threshold_min": None}}),
}
