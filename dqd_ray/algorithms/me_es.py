"""ME-ES (Colas et al. 2020), explore-exploit, as the official CMA-MEGA code runs it.

One evolution-strategies individual at a time climbs from an archive cell:

- every ``consecutive_steps`` iterations a new run starts: explore and exploit
  alternate (robin), a starting cell is drawn (explore: novelty-biased among
  the 5 most novel cells; exploit: the best cell by its last ES population's
  best return, or, half the time once 5 cells exist, one of the 2 best of the
  5 newest cells) and a fresh Adam optimizer starts from that cell's policy;
- each iteration draws ``num_pairs`` mirrored Gaussian perturbations
  (``theta +- noise_std * eps``), evaluates them with action noise, ranks their
  novelty (explore) or return (exploit) by centred ranks, steps Adam on
  ``-grad + l2_coeff * theta``, evaluates the new theta without action noise
  and inserts it into the archive;
- novelty is the mean squared distance to the ``novelty_k`` nearest measures
  of every policy evaluated so far (the novelty archive);
- observations are normalized by running statistics gathered from the
  negative-direction episodes, each kept with probability ``obs_collect_prob``.

The policy the ES moves acts on normalized observations. Every genome this
module hands out (to the rollout workers and the archive) has the current
normalization folded into its first layer, ``W' = W / std`` and
``b' = b - W' mean``: a plain policy of the same shape, so every other part of
the system (robustness, rendering, plots) reads ME-ES archives as it reads any
other. Each cell also keeps the statistics it was folded with, so a run that
restarts from the cell unfolds the ES parameters again.

The official code runs ``config="mees_damage"``, but the strategy settings it
takes from that config are those of ``mees_exploration`` (its configs share one
``mees_args`` dict, updated last by the exploration config): ``novelty_bias``
and ``best2inlast5_or_best``, our defaults. Everything here is state of the
emitter and goes into the checkpoint as arrays: the ES parameters, the Adam
moments, the observation statistics, the novelty archive and the per-cell
bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs
from dqd_ray.presets import PAPER, merge
from dqd_ray.state import statecodec

if TYPE_CHECKING:
    from dqd_ray.algorithms.scheduler import MaskedScheduler


class MEESConfig(AlgorithmSettings):
    """ME-ES, explore-exploit (Colas et al. 2020), with the official CMA-MEGA code's
    "mees_damage" settings as defaults (see :mod:`dqd_ray.algorithms.me_es`)."""

    name: Literal["me_es"] = "me_es"
    num_pairs: int = Field(
        100, gt=0, description="Mirrored perturbation pairs per iteration: 2x this many "
        "evaluations (official: 100 workers x batch 1)."
    )
    noise_std: float = Field(0.02, gt=0, description="Std of the parameter perturbations.")
    learning_rate: float = Field(0.01, gt=0, description="Adam learning rate of the ES step.")
    l2_coeff: float = Field(0.005, ge=0, description="L2 coefficient added to the ES gradient.")
    consecutive_steps: int = Field(
        10, gt=0, description="ES steps from one starting cell before a new cell is drawn."
    )
    novelty_k: int = Field(10, gt=0, description="Nearest neighbours of the novelty score.")
    mode: Literal["explore_exploit", "explore", "exploit"] = Field(
        "explore_exploit", description="Alternate novelty and return runs (robin), or only one."
    )
    explore_strategy: Literal["novelty_bias", "best_or_uniform", "uniform"] = Field(
        "novelty_bias", description="Starting cell of an explore run (official: novelty_bias)."
    )
    exploit_strategy: Literal["best2inlast5_or_best", "best_or_uniform", "uniform"] = Field(
        "best2inlast5_or_best", description="Starting cell of an exploit run (official: "
        "best2inlast5_or_best)."
    )
    action_noise: float = Field(
        0.01, ge=0, description="Gaussian action noise while evaluating the perturbations "
        "(none for the evaluation that is inserted)."
    )
    obs_norm: bool = Field(True, description="Normalize observations by running statistics.")
    obs_collect_prob: float = Field(
        0.001, ge=0, le=1, description="Probability that a negative-direction episode's "
        "observations join the statistics (official: 0.001)."
    )
    eval_episodes: int = Field(1, gt=0, description="Episodes of the new theta (mean inserted).")


Config = MEESConfig


def needs(cfg, measure_dim: int) -> Needs:
    return Needs(es_steps=True)  # no gradients from critics, no learner


def evaluations_per_iteration(cfg, needs: Needs) -> int:
    """Mirrored samples plus the new theta's episodes (plus x0 once, at the start)."""
    return 2 * cfg.algorithm.num_pairs + cfg.algorithm.eval_episodes


def build_scheduler(cfg, ctx: BuildContext) -> MaskedScheduler:
    from dqd_ray.algorithms.me_es_emitter import MEESEmitter
    from dqd_ray.algorithms.scheduler import MaskedScheduler

    if ctx.policy_first_layer is None:
        raise ValueError("me_es folds observation statistics into a policy's first layer: "
                         "give the BuildContext the policy's first layer (obs_dim, hidden)")
    archive_seed, emitter_seed = ctx.seeds(2)
    archive = ctx.archive(archive_seed)
    obs_dim, hidden = ctx.policy_first_layer
    emitter = MEESEmitter(archive, ctx.x0, obs_dim=obs_dim, hidden=hidden, cfg=cfg,
                          seed=emitter_seed)
    return MaskedScheduler(archive, [emitter])


def state_classes() -> tuple[tuple, dict]:
    from dqd_ray.algorithms.me_es_emitter import MEESEmitter

    # Checkpoints written before the emitter moved to its own module name it here.
    statecodec.allow_old_name("dqd_ray.algorithms.me_es.MEESEmitter", MEESEmitter)
    return (MEESEmitter,), {}


# The official count, 5000 x 100 x 2 = 1M, leaves out the new theta's episode
# of each iteration; ours counts it, so the 1M budget ends at iteration 4975.
PRESETS = {"me_es": merge(PAPER, {
    "iterations": 5000,
    "algorithm": {"name": "me_es", "num_pairs": 100, "noise_std": 0.02,
                  "learning_rate": 0.01, "l2_coeff": 0.005, "consecutive_steps": 10,
                  "novelty_k": 10, "mode": "explore_exploit",
                  "explore_strategy": "novelty_bias",
                  "exploit_strategy": "best2inlast5_or_best", "action_noise": 0.01,
                  "obs_norm": True, "obs_collect_prob": 0.001, "eval_episodes": 1},
})}
PAPER_PRESETS = ("me_es",)
