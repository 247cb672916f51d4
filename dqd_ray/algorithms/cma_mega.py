"""CMA-MEGA: gradient-arborescence emitters (Fontaine & Nikolaidis 2021), with
gradients from TD3 critics, evolution strategies or both (Tjanaka et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs
from dqd_ray.presets import PAPER, merge
from dqd_ray.state import statecodec
from dqd_ray.state.statecodec import ArraySpec

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler


class CMAMEGAConfig(AlgorithmSettings):
    """CMA-MEGA: gradient-arborescence emitters over a CMA-ES coefficient distribution."""

    name: Literal["cma_mega"] = "cma_mega"
    gradients: Literal["td3", "td3_es", "es"] = Field(
        "td3", description="Where gradients come from: TD3 critics for all objectives, "
        "TD3 for fitness and ES for measures (paper: CMA-MEGA (TD3, ES)), or ES for all."
    )
    num_emitters: int = Field(1, gt=0, description="Gradient-arborescence emitters (paper: 1).")
    batch_size: int = Field(
        16, ge=2, description="CMA-ES branches per emitter per iteration, theta and the greedy "
        "actor excluded (paper: 98 with the greedy TD3 actor, 99 without)."
    )
    sigma0: float = Field(1.0, gt=0, description="Initial CMA-ES step size of the coefficients.")
    lr: float = Field(1.0, gt=0, description="Step size of the gradient-ascent optimizer on theta.")
    selection_rule: Literal["mu", "filter"] = Field("mu", description="Parent selection.")
    restart_rule: Literal["no_improvement", "basic"] = Field("no_improvement")
    normalize_grad: bool = Field(True, description="Normalize each gradient row.")
    es_engine: Literal["cma_es", "sep_cma_es", "pycma_es"] = Field(
        "cma_es", description="CMA-ES implementation of the coefficient distribution: pyribs' "
        "own CMA-ES with positive weights over mu parents (the paper's), or pycma."
    )
    insert_greedy: bool | None = Field(
        None, description="Evaluate the greedy TD3 actor every iteration and insert it "
        "(default: whenever a fitness critic exists, as the paper does)."
    )

    @field_validator("es_engine")
    @classmethod
    def _checkpointable_engine(cls, v):
        if v == "pycma_es":
            raise ValueError("algorithm.es_engine=pycma_es: pycma's state holds code "
                             "references and cannot be checkpointed without pickle; use "
                             "cma_es (the paper's engine) or sep_cma_es (pycma remains "
                             "available to the Coordinator used as a library)")
        return v

    @model_validator(mode="after")
    def _greedy_needs_critic(self):
        if self.insert_greedy and self.gradients == "es":
            raise ValueError("insert_greedy needs a fitness critic, but gradients='es' trains "
                             "none; set gradients to td3 or td3_es, or insert_greedy=false")
        return self

    @property
    def greedy(self) -> bool:
        return self.gradients != "es" if self.insert_greedy is None else self.insert_greedy


Config = CMAMEGAConfig


def needs(cfg, measure_dim: int) -> Needs:
    rows = tuple(range(1 + measure_dim))
    learner_rows = {"td3": rows, "td3_es": (0,), "es": ()}[cfg.gradients]
    critics = learner_rows or ((0,) if cfg.greedy else ())
    return Needs(dqd=True, critic_objectives=critics, learner_rows=learner_rows,
                 es_rows=tuple(r for r in rows if r not in learner_rows),
                 greedy_insert=cfg.greedy, critic_updates=bool(critics))


def first_half_evaluations(cfg, needs: Needs) -> int:
    """The ES samples of each emitter's theta, evaluated before the jacobian
    (theta itself is evaluated with its branches: see
    :meth:`dqd_ray.roles.coordinator.Coordinator._gradient_step`)."""
    es = cfg.es.num_samples if needs.es_rows else 0
    return cfg.algorithm.num_emitters * es


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    a = cfg.algorithm
    return first_half_evaluations(cfg, needs) + a.num_emitters * (1 + a.batch_size) \
        + int(needs.greedy_insert)


def emitters(cfg, archive, ctx: BuildContext, seeds: list[int]) -> list:
    from dqd_ray.algorithms.branch_emitter import BranchEmitter

    return [
        BranchEmitter(
            archive, x0=ctx.x0, sigma0=cfg.sigma0, lr=cfg.lr, grad_opt="gradient_ascent",
            es=cfg.es_engine, selection_rule=cfg.selection_rule, restart_rule=cfg.restart_rule,
            normalize_grad=cfg.normalize_grad, batch_size=cfg.batch_size, seed=s,
        )
        for s in seeds
    ]


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from dqd_ray.algorithms.scheduler import MaskedScheduler

    archive_seed, *emitter_seeds = ctx.seeds(1 + cfg.num_emitters)
    archive = ctx.archive(archive_seed)
    return MaskedScheduler(archive, emitters(cfg, archive, ctx, emitter_seeds))


# Arrays of a CMA-ES that are None until it runs.
CMA_ARRAYS = {"_solutions": ArraySpec("f", (None, "solution_dim")),
              "mean": ArraySpec("f", ("solution_dim",)), "pc": ArraySpec("f", ("solution_dim",)),
              "ps": ArraySpec("f", ("solution_dim",))}


def state_classes() -> tuple[tuple, dict]:
    """What a CMA-MEGA checkpoint may hold: its emitters, their CMA-ES and optimizers."""
    from ribs.emitters import GradientArborescenceEmitter
    from ribs.emitters.opt import _adam_opt, _cma_es, _gradient_ascent_opt, _sep_cma_es

    from dqd_ray.algorithms.branch_emitter import BranchEmitter

    # Checkpoints written before BranchEmitter hold pyribs' class: the same state.
    statecodec.allow_old_name(f"{GradientArborescenceEmitter.__module__}."
                              f"{GradientArborescenceEmitter.__qualname__}", BranchEmitter)
    classes = (BranchEmitter, _cma_es.CMAEvolutionStrategy, _cma_es.DecompMatrix,
               _sep_cma_es.SeparableCMAEvolutionStrategy, _sep_cma_es.DiagonalMatrix,
               _gradient_ascent_opt.GradientAscentOpt, _adam_opt.AdamOpt)
    arrays = {
        BranchEmitter: {"_jacobian_batch": ArraySpec(
            "f", (None, "_num_coefficients", "_solution_dim"))},
        _cma_es.CMAEvolutionStrategy: CMA_ARRAYS,
        _sep_cma_es.SeparableCMAEvolutionStrategy: CMA_ARRAYS,
    }
    return classes, arrays

# The paper's CMA-MEGA (official gin files, config/algorithms/cma_mega*.gin).
_PAPER_CMA_MEGA = {"name": "cma_mega", "num_emitters": 1, "sigma0": 1.0, "lr": 1.0,
                   "selection_rule": "mu", "restart_rule": "no_improvement",
                   "normalize_grad": True, "es_engine": "cma_es"}
PRESETS = {
    "cma_mega_td3_es": merge(PAPER, {
        "iterations": 5000,
        "algorithm": {**_PAPER_CMA_MEGA, "gradients": "td3_es", "batch_size": 98,
                      "insert_greedy": True},
        "es": {"sigma": 0.02, "num_samples": 100},
        "td3": {"train_steps_per_iteration": 600, "jacobian_states": 65536},
    }),
    "cma_mega_es": merge(PAPER, {
        "iterations": 5000,
        "algorithm": {**_PAPER_CMA_MEGA, "gradients": "es", "batch_size": 99,
                      "insert_greedy": False},
        "es": {"sigma": 0.02, "num_samples": 100},
    }),
    # Our own variant: TD3 critics for fitness and every measure.
    "cma_mega_td3": {"algorithm": {"name": "cma_mega", "gradients": "td3"}},
}
PAPER_PRESETS = ("cma_mega_td3_es", "cma_mega_es")
