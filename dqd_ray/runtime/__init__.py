"""The system's runtime: it builds a run's roles from one config and places them.

- ``builder.py``: :class:`System` and :func:`build` (every role of a run), and
  :class:`EvaluationPool` (rollout workers alone);
- ``placement.py``: in process or on Ray, and everything that differs between them;
- ``waits.py``: the deadline of every wait on Ray;
- ``resources.py``: seeds, sizes and all bundle arithmetic (fit checks, the
  autoscaler request, a Tune trial's bundles);
- ``evaluator.py``: evaluations spread over the rollout workers;
- ``learners.py``: the learner group and its fault handling.
"""

from dqd_ray.runtime.builder import EvaluationPool, System, build
from dqd_ray.runtime.learners import LearnerGroup
from dqd_ray.runtime.placement import InProcess, OnRay
from dqd_ray.runtime.resources import (
                                       GPUUnavailableError,
                                       ResourceError,
                                       Seeds,
                                       algorithm_needs,
                                       evaluations_per_iteration,
                                       resolve_resources,
)

__all__ = ["EvaluationPool", "GPUUnavailableError", "InProcess", "LearnerGroup", "OnRay",
           "ResourceError", "Seeds", "System", "algorithm_needs", "build",
           "evaluations_per_iteration", "resolve_resources"]
