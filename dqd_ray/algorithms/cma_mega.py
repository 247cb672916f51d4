"""CMA-MEGA: gradient-arborescence emitters (Fontaine & Nikolaidis 2021), with
gradients from TD3 critics, evolution strategies or both (Tjanaka et al. 2022)."""

from __future__ import annotations

from ribs.emitters import GradientArborescenceEmitter

from dqd_ray.algorithms.base import BuildContext, MaskedScheduler, Needs


def needs(cfg, measure_dim: int) -> Needs:
    rows = tuple(range(1 + measure_dim))
    learner_rows = {"td3": rows, "td3_es": (0,), "es": ()}[cfg.gradients]
    critics = learner_rows or ((0,) if cfg.greedy else ())
    return Needs(dqd=True, critic_objectives=critics, learner_rows=learner_rows,
                 es_rows=tuple(r for r in rows if r not in learner_rows),
                 greedy_insert=cfg.greedy, critic_updates=bool(critics))


def emitters(cfg, archive, ctx: BuildContext, seeds: list[int]) -> list:
    return [
        GradientArborescenceEmitter(
            archive, x0=ctx.x0, sigma0=cfg.sigma0, lr=cfg.lr, grad_opt="gradient_ascent",
            es=cfg.es_engine, selection_rule=cfg.selection_rule, restart_rule=cfg.restart_rule,
            normalize_grad=cfg.normalize_grad, batch_size=cfg.batch_size, seed=s,
        )
        for s in seeds
    ]


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    archive_seed, *emitter_seeds = ctx.seeds(1 + cfg.num_emitters)
    archive = ctx.archive(archive_seed)
    return MaskedScheduler(archive, emitters(cfg, archive, ctx, emitter_seeds))
