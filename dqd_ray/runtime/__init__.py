"""The system's runtime: it builds a run's roles from one config and places them.

- ``builder.py``: :class:`System` and :func:`build` (every role of a run), and
  :class:`EvaluationPool` (rollout workers alone);
- ``placement.py``: in process or on Ray, and everything that differs between them;
- ``waits.py``: the deadline of every wait on Ray;
- ``resources.py``: seeds, sizes and all bundle arithmetic (fit checks, the
  autoscaler request, a Tune trial's bundles);
- ``evaluator.py``: evaluations spread over the rollout workers;
- ``learners.py``: the learner group and its fault handling.

The names below are imported on first use: a rollout worker's process that
needs only ``waits`` (through the replay sink) never imports the builder, and
so neither torch nor pyribs.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "EvaluationPool": "builder", "System": "builder", "build": "builder",
    "LearnerGroup": "learners", "InProcess": "placement", "OnRay": "placement",
    "GPUUnavailableError": "resources", "ResourceError": "resources", "Seeds": "resources",
    "algorithm_needs": "resources", "evaluations_per_iteration": "resources",
    "resolve_resources": "resources",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dqd_ray.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dqd_ray.runtime.{_PUBLIC[name]}"), name)
