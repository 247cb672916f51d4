"""Staged critic updates may run while the iteration asks for gradients: the
learner answers from the networks as they were when the updates were staged,
so training early (through both halves of an iteration) gives the numbers of
training after the gradient requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqd_ray.config import TD3Config
from dqd_ray.roles.learner import Learner
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.replay import ReplayBuffer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS, ACT, REW = 5, 2, 3


def _learner() -> Learner:
    spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
    buf = ReplayBuffer(OBS, ACT, REW, capacity=2000, seed=0)
    rng = np.random.default_rng(0)
    n = 1500
    buf.add({"obs": rng.normal(size=(n, OBS)).astype(np.float32),
             "action": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
             "reward": rng.normal(size=(n, REW)).astype(np.float32),
             "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
             "terminated": (rng.random(n) < 0.1).astype(np.float32)})
    cfg = TD3Config(critic_hidden_sizes=[16], batch_size=32, learning_starts=100)
    return Learner(spec, REW, cfg, buf, seed=3)


def _params(lr: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lr.ensemble.critic.parameters()]


def test_gradients_come_from_the_networks_of_the_stage_while_updates_run():
    early, late = _learner(), _learner()
    genomes = np.stack([early.ensemble.spec.init_genome(np.random.default_rng(i))
                        for i in range(3)])
    pg_genomes = genomes[:2].copy()
    # The early learner trains right after staging, before the requests.
    early.stage(40)
    before = _params(early)
    early.train_staged()
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(early)))  # it trained
    j_early = early.jacobian(genomes)
    g_early = early.greedy_genome()
    v_early = early.pg_variation(pg_genomes, 2, 1e-3, 16)
    # The late learner answers first and trains after (the paper's order).
    late.stage(40)
    j_late = late.jacobian(genomes)
    g_late = late.greedy_genome()
    v_late = late.pg_variation(pg_genomes, 2, 1e-3, 16)
    late.train_staged()
    np.testing.assert_array_equal(j_early, j_late)
    np.testing.assert_array_equal(g_early, g_late)
    np.testing.assert_array_equal(v_early, v_late)
    for a, b in zip(_params(early), _params(late)):
        assert torch.equal(a, b)  # the same updates on the same batches


def test_the_next_stage_answers_from_the_trained_networks():
    lr = _learner()
    genomes = lr.ensemble.spec.init_genome(np.random.default_rng(0))[None]
    states = np.random.default_rng(1).normal(size=(64, OBS)).astype(np.float32)
    lr.stage(40)
    j0 = lr.jacobian(genomes, states)
    lr.train_staged()
    assert np.array_equal(lr.jacobian(genomes, states), j0)  # still the staged networks
    lr.stage(40)  # the next iteration: the trained networks answer now
    j1 = lr.jacobian(genomes, states)
    assert not np.array_equal(j1, j0)
    lr.train_staged()
    lr.load_state_dict(lr.state_dict())  # a load drops the frozen copy: live networks
    assert not np.array_equal(lr.jacobian(genomes, states), j1)


def test_updates_sent_with_their_stage_wait_for_it():
    """A group sends the stage and the updates at once, to two concurrency
    groups: the updates wait for the stage of their ticket, and train nothing
    when it never comes (a learner restarted in between)."""
    import threading
    import time

    lr = _learner()
    before = _params(lr)
    result: dict = {}
    updates = threading.Thread(target=lambda: result.update(lr.train_staged(None, 7)))
    updates.start()
    time.sleep(0.2)
    assert updates.is_alive()  # waiting for stage 7
    assert lr.stage(30, 7) == 30
    updates.join(timeout=60)
    assert not updates.is_alive() and result["updates"] == 30
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(lr)))
    t0 = time.monotonic()
    assert lr.train_staged(None, 8, timeout_s=0.3) == {"updates": 0}
    assert 0.3 <= time.monotonic() - t0 < 30


def test_jacobian_of_an_empty_buffer_is_seeded_random_directions():
    # The first iteration's jacobian comes before any experience reaches the
    # buffer (as in the paper's code): random directions, from the learner's
    # seeded generator, so runs still repeat.
    def learner():
        spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
        cfg = TD3Config(critic_hidden_sizes=[16], batch_size=32, learning_starts=100)
        return Learner(spec, REW, cfg, ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0),
                       seed=3)

    a, b = learner(), learner()
    genomes = np.stack([a.ensemble.spec.init_genome(np.random.default_rng(i)) for i in range(2)])
    ja, jb = a.jacobian(genomes), b.jacobian(genomes)
    assert ja.shape == (2, REW, genomes.shape[1]) and np.isfinite(ja).all()
    np.testing.assert_array_equal(ja, jb)  # seeded
    assert not np.array_equal(a.jacobian(genomes), ja)  # a new draw each call
    # Standard normal: about 400 draws, so 4 standard errors of the mean and of the std.
    assert abs(float(ja.mean())) < 0.2 and 0.85 < float(ja.std()) < 1.15


def test_random_jacobian_rows_do_not_depend_on_how_objectives_are_split():
    def learner(objectives):
        spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
        cfg = TD3Config(critic_hidden_sizes=[16], batch_size=32, learning_starts=100)
        return Learner(spec, REW, cfg, ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0),
                       seed=3, objectives=objectives)

    genomes = np.zeros((2, PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8]).genome_dim))
    whole = learner([0, 1, 2]).jacobian(genomes)
    parts = np.concatenate([learner([0, 1]).jacobian(genomes), learner([2]).jacobian(genomes)],
                           axis=1)
    np.testing.assert_array_equal(whole, parts)
