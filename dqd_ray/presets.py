"""The presets: the paper's settings (official gin files) and our own variants,
as overrides of the config's defaults."""

from __future__ import annotations

import copy
from typing import Any


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a deep copy of ``base`` (nested dicts merged too)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out



# The paper's settings (official gin files of Tjanaka et al. 2022, config/algorithms/
# and config/qd_*/): one episode of at most 1000 steps per evaluation, a 128x128 tanh
# Xavier policy, no action noise or observation normalization (our defaults), episodes
# cut by the time limit counted as done, robustness of the best elite every iteration,
# 1,000,000 evaluations, critics trained a fixed number of updates per iteration.
_PAPER = {
    "evaluations": 1_000_000,
    "td3": {"time_limit_done": True},
    "resources": {"learner_mode": "sync"},
    "metrics": {"robustness_every": 1, "robustness_episodes": 10},
}
_PAPER_CMA_MEGA = {"name": "cma_mega", "num_emitters": 1, "sigma0": 1.0, "lr": 1.0,
                   "selection_rule": "mu", "restart_rule": "no_improvement",
                   "normalize_grad": True, "es_engine": "cma_es"}

PRESETS: dict[str, dict[str, Any]] = {
    # Paper presets.
    "cma_mega_td3_es": merge(_PAPER, {
        "iterations": 5000,
        "algorithm": {**_PAPER_CMA_MEGA, "gradients": "td3_es", "batch_size": 98,
                      "insert_greedy": True},
        "es": {"sigma": 0.02, "num_samples": 100},
        "td3": {"train_steps_per_iteration": 600, "jacobian_states": 65536},
    }),
    "cma_mega_es": merge(_PAPER, {
        "iterations": 5000,
        "algorithm": {**_PAPER_CMA_MEGA, "gradients": "es", "batch_size": 99,
                      "insert_greedy": False},
        "es": {"sigma": 0.02, "num_samples": 100},
    }),
    "pga_me": merge(_PAPER, {
        "iterations": 10000,
        "algorithm": {"name": "pga_me", "iso_sigma": 0.005, "line_sigma": 0.05,
                      "iso_batch_size": 50, "pg_batch_size": 50, "pg_steps": 10,
                      "pg_lr": 0.001, "pg_states": 256, "init_sigma": 0.02},
        "td3": {"train_steps_per_iteration": 300},
    }),
    "map_elites": merge(_PAPER, {
        "iterations": 10000,
        "algorithm": {"name": "map_elites", "sigma": 0.02, "batch_size": 100},
    }),
    # The official count, 5000 x 100 x 2 = 1M, leaves out the new theta's episode
    # of each iteration; ours counts it, so the 1M budget ends at iteration 4975.
    "me_es": merge(_PAPER, {
        "iterations": 5000,
        "algorithm": {"name": "me_es", "num_pairs": 100, "noise_std": 0.02,
                      "learning_rate": 0.01, "l2_coeff": 0.005, "consecutive_steps": 10,
                      "novelty_k": 10, "mode": "explore_exploit",
                      "explore_strategy": "novelty_bias",
                      "exploit_strategy": "best2inlast5_or_best", "action_noise": 0.01,
                      "obs_norm": True, "obs_collect_prob": 0.001, "eval_episodes": 1},
    }),
    # Our own variants.
    "cma_mega_td3": {"algorithm": {"name": "cma_mega", "gradients": "td3"}},
    "cma_maega_td3": {"algorithm": {"name": "cma_maega", "gradients": "td3"}},
}
PAPER_PRESETS = ("cma_mega_td3_es", "cma_mega_es", "pga_me", "map_elites", "me_es")
