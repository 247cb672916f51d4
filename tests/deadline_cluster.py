"""Deadline scenarios on a two-node ``ray.cluster_utils.Cluster`` (run by
tests/test_deadlines.py in a subprocess: a Ray apart from the suite's).

Prints one JSON line: for each scenario the error it ended with, its message
and the seconds it took.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from dqd_ray.config import build_config  # noqa: E402

SMALL = ["env.episode_length=30", "algorithm.batch_size=3", "resources.num_rollout_workers=1",
         "resources.envs_per_worker=1", "logging.progress_bar=false"]


def _outcome(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
        return {"error": None, "message": "", "seconds": time.monotonic() - t0}
    except Exception as err:  # noqa: BLE001 - the outcome is what is reported
        return {"error": type(err).__name__, "message": str(err),
                "seconds": time.monotonic() - t0}


def oversized() -> dict:
    """Two 1-CPU nodes hold 2 CPUs in total, but a 2-CPU worker on neither."""
    from dqd_ray.runtime import resolve_resources

    cfg = build_config("map_elites", sets=[*SMALL, "resources.cpus_per_worker=2",
                                           "resources.wait_for_resources_s=2"])
    return _outcome(lambda: resolve_resources(cfg))


def restart(cluster: Cluster) -> dict:
    """The worker's node (the only one with the ``rollout`` resource) is removed:
    the worker cannot be restarted anywhere, and its evaluation stops after
    ``wait_for_resources_s``."""
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.runtime import System

    node = cluster.add_node(num_cpus=1, resources={"rollout": 1})
    cluster.wait_for_nodes()
    cfg = build_config("map_elites", sets=[*SMALL, "resources.rollout_resource=rollout",
                                           "resources.wait_for_resources_s=3"])
    system = System(cfg, "ray")
    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    genomes = np.stack([spec.init_genome(np.random.default_rng(i)) for i in range(2)])
    system.evaluator.evaluate(genomes, np.arange(2), record=False)  # placed and working
    cluster.remove_node(node)
    out = _outcome(lambda: system.evaluator.evaluate(genomes, np.arange(2), record=False))
    system.close()
    return out


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        result = {"oversized": oversized(), "restart": restart(cluster)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
