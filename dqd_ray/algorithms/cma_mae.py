"""CMA-MAE with scalable ES engines (Tjanaka et al. 2023, "Training Diverse
High-Dimensional Controllers by Scaling Covariance Matrix Adaptation
MAP-Annealing"): evolution-strategies emitters ranked by improvement over an
archive with a learning rate (soft thresholds), with a separate plain archive
that keeps the best policy per cell (what every metric, heatmap and checkpoint
reports).

The engines are pyribs' own: ``sep_cma_es`` (diagonal covariance), ``lm_ma_es``
(limited-memory matrix adaptation) and ``openai_es`` (OpenAI-ES with mirror
sampling and Adam). The presets hold the settings of that paper's public code
(``config/algorithms/{sep_cma_mae,lm_ma_mae,openai_mae}.gin`` and
``config/qd_*/shared.gin`` of icaros-usc/scaling-cma-mae); docs/algorithms.md
says where pyribs differs from that code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from dqd_ray.algorithms import cma_maega, cma_mega
from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs
from dqd_ray.presets import PAPER, merge
from dqd_ray.state.statecodec import ArraySpec

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler


class CMAMAEConfig(AlgorithmSettings):
    """CMA-MAE: ES emitters ranked by improvement over an annealed archive."""

    name: Literal["cma_mae"] = "cma_mae"
    es_engine: Literal["sep_cma_es", "lm_ma_es", "openai_es", "cma_es"] = Field(
        "sep_cma_es", description="pyribs ES engine of each emitter (paper: sep_cma_es, "
        "lm_ma_es or openai_es; cma_es is the full covariance, slow past ~10^4 parameters)."
    )
    num_emitters: int = Field(5, gt=0, description="ES emitters (paper: 5).")
    batch_size: int = Field(40, ge=2, description="Solutions per emitter per iteration "
                            "(paper: 40; even for openai_es with mirror sampling).")
    sigma0: float = Field(0.02, gt=0, description="Initial step size of every ES (paper: 0.02).")
    ranker: Literal["imp", "2imp", "obj", "2obj", "rd", "2rd"] = Field(
        "imp", description="pyribs ranker: improvement over the cell's threshold (paper: imp)."
    )
    selection_rule: Literal["mu", "filter"] = Field(
        "mu", description="Parents: the best half (mu, the paper's truncation) or the improvers."
    )
    restart_rule: Literal["basic", "no_improvement"] = Field(
        "basic", description="Restart an ES from an elite when it converges (paper: basic)."
    )
    archive_learning_rate: float = Field(
        0.001, gt=0, le=1, description="Archive learning rate of the annealed archive "
        "(paper: 0.001; 1 is plain MAP-Elites insertion)."
    )
    threshold_min: float | None = Field(
        None, description="Threshold of an empty cell; default: the env's QD-score offset "
        "(paper: that offset)."
    )
    mirror_sampling: bool = Field(True, description="openai_es: mirrored noise (paper: true).")
    adam_lr: float = Field(0.01, gt=0, description="openai_es: Adam learning rate (paper: 0.01).")
    adam_l2_coeff: float = Field(
        0.005, ge=0, description="openai_es: L2 coefficient of Adam (paper: 0.005)."
    )
    lm_vectors: int | None = Field(
        None, gt=0, description="lm_ma_es: memory vectors (default and paper: the batch size)."
    )


Config = CMAMAEConfig


def needs(cfg, measure_dim: int) -> Needs:
    return Needs()  # no gradients, no critics, no learner


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    return cfg.algorithm.num_emitters * cfg.algorithm.batch_size


def es_kwargs(cfg) -> dict:
    """The engine's own settings, as pyribs takes them."""
    if cfg.es_engine == "openai_es":
        return {"mirror_sampling": cfg.mirror_sampling, "lr": cfg.adam_lr,
                "l2_coeff": cfg.adam_l2_coeff}
    if cfg.es_engine == "lm_ma_es":
        return {"n_vectors": cfg.lm_vectors}
    return {}


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from ribs.emitters import EvolutionStrategyEmitter

    from dqd_ray.algorithms.scheduler import MaskedScheduler

    archive, result, emitter_seeds = cma_maega.annealed_archives(cfg, ctx)
    emitters = [
        EvolutionStrategyEmitter(
            archive, x0=ctx.x0, sigma0=cfg.sigma0, ranker=cfg.ranker, es=cfg.es_engine,
            es_kwargs=es_kwargs(cfg), selection_rule=cfg.selection_rule,
            restart_rule=cfg.restart_rule, batch_size=cfg.batch_size, seed=s)
        for s in emitter_seeds
    ]
    return MaskedScheduler(archive, emitters, result_archive=result)


def state_classes() -> tuple[tuple, dict]:
    """What a CMA-MAE checkpoint may hold: its ES emitters and every engine's state."""
    from ribs.emitters import EvolutionStrategyEmitter
    from ribs.emitters.opt import _adam_opt, _cma_es, _lm_ma_es, _openai_es, _sep_cma_es

    batch = ArraySpec("f", (None, "solution_dim"))
    classes = (EvolutionStrategyEmitter, _sep_cma_es.SeparableCMAEvolutionStrategy,
               _sep_cma_es.DiagonalMatrix, _lm_ma_es.LMMAEvolutionStrategy,
               _openai_es.OpenAIEvolutionStrategy, _adam_opt.AdamOpt,
               _cma_es.CMAEvolutionStrategy, _cma_es.DecompMatrix)
    arrays = {
        _sep_cma_es.SeparableCMAEvolutionStrategy: cma_mega.CMA_ARRAYS,
        _cma_es.CMAEvolutionStrategy: cma_mega.CMA_ARRAYS,
        _lm_ma_es.LMMAEvolutionStrategy: {"_solutions": batch, "_solution_z": batch},
        _openai_es.OpenAIEvolutionStrategy: {"_solutions": batch, "noise": batch},
    }
    return classes, arrays


# The scaling paper's settings (config/algorithms/*_mae.gin, config/qd_*/shared.gin):
# 5 emitters x 40 = 200 evaluations per iteration, 1,000,000 evaluations.
_MAE = merge(PAPER, {"iterations": 5000, "algorithm": {
    "name": "cma_mae", "num_emitters": 5, "batch_size": 40, "sigma0": 0.02, "ranker": "imp",
    "selection_rule": "mu", "restart_rule": "basic", "archive_learning_rate": 0.001}})
PRESETS = {
    "sep_cma_mae": merge(_MAE, {"algorithm": {"es_engine": "sep_cma_es"}}),
    "lm_ma_mae": merge(_MAE, {"algorithm": {"es_engine": "lm_ma_es"}}),
    "openai_mae": merge(_MAE, {"algorithm": {"es_engine": "openai_es", "mirror_sampling": True,
                                             "adam_lr": 0.01, "adam_l2_coeff": 0.005}}),
}
PAPER_PRESETS = ("sep_cma_mae", "lm_ma_mae", "openai_mae")
