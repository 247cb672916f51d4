"""A CPU learner's torch threads follow the CPUs it asks for; resources.torch_threads
(or the builder's argument) wins."""

from __future__ import annotations

import pytest
import torch

from dqd_ray.config import build_config
from dqd_ray.roles.learner import learner_threads
from dqd_ray.runtime import System

TINY = ["env.episode_length=20", "algorithm.batch_size=4", "td3.batch_size=16",
        "td3.critic_hidden_sizes=[8]", "td3.replay_capacity=1000",
        "resources.envs_per_worker=1", "resources.learner_mode=async",
        "logging.progress_bar=false"]


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (2.0, 2), (4.0, 4), (0.5, 1), (0.25, 1),
                                           (0.0, 1), (1.5, 2), (2.6, 3)])
def test_one_thread_per_cpu_and_one_on_a_share_of_a_core(cpus, threads):
    assert learner_threads(cpus) == threads


@pytest.mark.parametrize("sets, arg, threads", [
    (["resources.cpus_per_learner=2"], None, 2),
    (["resources.cpus_per_learner=0.5"], None, 1),
    (["resources.cpus_per_learner=2", "resources.torch_threads=3"], None, 3),
    (["resources.cpus_per_learner=2", "resources.torch_threads=3"], 1, 1),
])
def test_the_builder_gives_a_cpu_learner_threads_for_its_cpus(sets, arg, threads,
                                                              keep_torch_threads):
    """In process the learner lives in this process: its threads are torch's here. (Async:
    a learner that reserves its CPUs, whatever Ray this session runs.)"""
    torch.set_num_threads(5)
    system = System(build_config("cma_mega_td3", sets=[*TINY, *sets]), "inprocess",
                    torch_threads=arg)
    try:
        assert torch.get_num_threads() == threads
    finally:
        system.close()
