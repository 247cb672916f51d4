"""Shared fixtures. Ray (when a test needs it) is started once per session."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session."""
    import ray

    if not ray.is_initialized():
        # address="local": always a Ray of its own, never a cluster another
        # process left running on this machine (whose CPUs would not be ours).
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch ops: one thread. On a busy 2-core machine torch's default
    thread pool makes each critic update tens of times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The longest files first (their seconds in a `make test` on 2 cores): `make
# test` hands whole files to its 2 processes in collection order, so starting
# the long ones first keeps one process from running a long file alone at the
# end. The order of the tests within a file is unchanged.
LONGEST_FIRST = ("test_ray_presets.py", "test_faults.py", "test_tune.py", "test_deadlines.py",
                 "test_ray_system.py", "test_secrets.py", "test_loop.py", "test_benchmarks.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
