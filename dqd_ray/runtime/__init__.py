"""The system's runtime: placements (in process or on Ray), the pooled
evaluator, the learner group, resource resolution. :mod:`dqd_ray.system`
builds a run from these parts."""
