"""What presets share: the paper's common settings and the merge of overrides.

Each algorithm module declares its own presets (``PRESETS``, see
:mod:`dqd_ray.algorithms.registry`); the registry collects them.
"""

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
PAPER: dict[str, Any] = {
    "evaluations": 1_000_000,
    "td3": {"time_limit_done": True},
    "resources": {"learner_mode": "sync"},
    "metrics": {"robustness_every": 1, "robustness_episodes": 10},
}
