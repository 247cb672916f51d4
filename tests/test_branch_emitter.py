"""BranchEmitter forms pyribs' branches bit for bit, without the big temporary."""

import numpy as np
import pytest
from ribs.archives import GridArchive
from ribs.emitters import GradientArborescenceEmitter

from dqd_ray.algorithms.branch_emitter import BranchEmitter, branches


def _emitter(cls, dim: int, seed: int):
    archive = GridArchive(solution_dim=dim, dims=[6, 6, 6, 6], ranges=[(0, 1)] * 4, seed=seed)
    return cls(archive, x0=np.linspace(-1, 1, dim), sigma0=1.0, lr=1.0,
               grad_opt="gradient_ascent", selection_rule="mu", normalize_grad=True,
               batch_size=17, seed=seed)


@pytest.mark.parametrize("dim", [3, 1000])
def test_branches_equal_pyribs_bit_for_bit_over_iterations(dim):
    rng = np.random.default_rng(dim)
    ours, ribs_em = _emitter(BranchEmitter, dim, 1), _emitter(GradientArborescenceEmitter, dim, 1)
    for _ in range(4):
        theta_a, theta_b = ours.ask_dqd(), ribs_em.ask_dqd()
        np.testing.assert_array_equal(theta_a, theta_b)
        jac = rng.standard_normal((1, 5, dim)) * rng.uniform(1e-3, 1e3)
        obj, meas = rng.normal(size=1), rng.uniform(0, 1, (1, 4))
        for em, theta in ((ours, theta_a), (ribs_em, theta_b)):
            info = em.archive.add(theta, obj, meas)
            em.tell_dqd(theta, obj, meas, jac.copy(), info)
        a, b = ours.ask(), ribs_em.ask()
        assert a.shape == (17, dim) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # the same products, summed in the same order
        objs, ms = rng.normal(size=17), rng.uniform(0, 1, (17, 4))
        for em, sols in ((ours, a), (ribs_em, b)):
            em.tell(sols, objs, ms, em.archive.add(sols, objs, ms))


def test_branches_function_matches_the_broadcast_sum():
    rng = np.random.default_rng(0)
    theta, jac, c = rng.normal(size=50), rng.normal(size=(3, 50)), rng.normal(size=(7, 3))
    np.testing.assert_array_equal(branches(theta, jac, c),
                                  theta + np.sum(jac[None] * c[:, :, None], axis=1))


def test_ask_before_tell_dqd_keeps_pyribs_error():
    em = _emitter(BranchEmitter, 4, 0)
    with pytest.raises(RuntimeError, match="ask_dqd"):
        em.ask()
