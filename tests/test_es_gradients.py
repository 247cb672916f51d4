"""Mirrored, rank-normalized ES gradient estimates."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from dqd_ray.roles.es_gradients import ESGradient, centered_ranks


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_centered_ranks_1d():
    v = np.array([3.0, -1.0, 10.0, 0.5, 2.0])
    r = centered_ranks(v)
    np.testing.assert_allclose(r, [0.25, -0.5, 0.5, -0.25, 0.0])
    assert r.shape == v.shape


def test_centered_ranks_2d_per_column():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3))
    v[:, 2] = -v[:, 0]  # reversed order in column 2
    r = centered_ranks(v)
    assert r.shape == (50, 3)
    assert r.min() >= -0.5 and r.max() <= 0.5
    for j in range(3):
        np.testing.assert_allclose(np.sort(r[:, j]), np.linspace(-0.5, 0.5, 50))
        # Monotone in the values.
        order = np.argsort(v[:, j])
        assert np.all(np.diff(r[order, j]) > 0)
    np.testing.assert_allclose(r[:, 2], -r[:, 0])
    # Scale invariant: only ranks matter.
    np.testing.assert_allclose(centered_ranks(1e6 * v + 5), r)


def test_centered_ranks_handle_infinities_and_ties():
    r = centered_ranks(np.array([1.0, -np.inf, 1.0, 7.0]))
    np.testing.assert_allclose(r, np.array([1, 0, 2, 3]) / 3 - 0.5)
    assert centered_ranks(np.array([4.0])).tolist() == [-0.5]


def test_mirrored_points_are_symmetric():
    es = ESGradient(sigma=0.1, num_samples=8, seed=0)
    theta = np.arange(5, dtype=np.float32)
    points, eps = es.perturb(theta)
    assert points.shape == (8, 5) and eps.shape == (4, 5)
    assert points.dtype == np.float32
    np.testing.assert_allclose(points[:4] + points[4:], np.tile(2 * theta, (4, 1)), atol=1e-5)
    np.testing.assert_allclose(points[:4] - theta, 0.1 * eps, atol=1e-5)
    np.testing.assert_allclose(points[4:] - theta, -0.1 * eps, atol=1e-5)


def test_seeded_and_advancing():
    a, b = ESGradient(0.1, 10, seed=3), ESGradient(0.1, 10, seed=3)
    theta = np.zeros(4)
    pa, _ = a.perturb(theta)
    pb, _ = b.perturb(theta)
    np.testing.assert_array_equal(pa, pb)
    pa2, _ = a.perturb(theta)
    assert not np.allclose(pa, pa2)


def test_quadratic_gradient_direction():
    rng = np.random.default_rng(1)
    dim = 20
    c = rng.normal(size=dim)
    x = rng.normal(size=dim)
    es = ESGradient(sigma=0.05, num_samples=2000, seed=0)

    def f(points):
        return -np.sum((points - c) ** 2, axis=1)

    g = es.gradient(x, f)
    assert g.shape == (1, dim)
    assert cosine(g[0], c - x) > 0.9
    # A step along the estimate improves f.
    step = 0.1 * g[0] / np.linalg.norm(g[0])
    assert f((x + step)[None])[0] > f(x[None])[0]


def test_estimate_exact_on_single_direction():
    """One mirrored pair: the + point wins, so the estimate is eps * 1 / (2 sigma)."""
    es = ESGradient(sigma=0.5, num_samples=2, seed=0)
    eps = np.array([[1.0, -2.0, 0.5]])
    g = es.estimate(eps, np.array([3.0, 1.0]))
    np.testing.assert_allclose(g, eps * (0.5 - (-0.5)) / (2 * 0.5))
    g = es.estimate(eps, np.array([1.0, 3.0]))
    np.testing.assert_allclose(g, -eps * 1.0 / (2 * 0.5))


def test_multi_objective_shape_and_directions():
    dim = 10
    es = ESGradient(sigma=0.05, num_samples=1000, seed=2)
    x = np.zeros(dim)
    w = np.eye(dim)[:3]  # objective j = x_j, so gradient e_j
    points, eps = es.perturb(x)
    values = points @ w.T  # (num_samples, 3)
    g = es.estimate(eps, values)
    assert g.shape == (3, dim)
    for j in range(3):
        assert int(np.argmax(g[j])) == j
        assert cosine(g[j], w[j]) > 0.9
    # Each row is what a single-objective estimate of that column gives.
    np.testing.assert_allclose(g[1], es.estimate(eps, values[:, 1])[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        ESGradient(0.1, num_samples=5)
    with pytest.raises(ValueError, match="even"):
        ESGradient(0.1, num_samples=0)
    with pytest.raises(ValueError, match="sigma"):
        ESGradient(0.0, num_samples=4)
    with pytest.raises(ValueError, match="sigma"):
        ESGradient(-1.0, num_samples=4)
    es = ESGradient(0.1, num_samples=4, seed=0)
    _, eps = es.perturb(np.zeros(3))
    with pytest.raises(ValueError, match="expected 4 values"):
        es.estimate(eps, np.zeros(6))


def test_estimate_magnitude_with_several_pairs():
    """Ranks of [3, 2 | 0, 1] are [3, 2, 0, 1] / 3 - 0.5: the pair differences
    are 1 and 1/3, and the estimate divides by num_samples * sigma = 0.8."""
    es = ESGradient(sigma=0.2, num_samples=4, seed=0)
    eps = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0]])
    g = es.estimate(eps, np.array([3.0, 2.0, 0.0, 1.0]))
    expected = (1.0 * eps[0] + (1 / 3) * eps[1]) / 0.8
    np.testing.assert_allclose(g[0], expected)


def test_centered_ranks_break_long_ties_by_order():
    values = np.zeros(40)
    np.testing.assert_allclose(centered_ranks(values), np.arange(40) / 39 - 0.5)
    cols = np.zeros((40, 2))
    cols[:, 1] = np.arange(40)[::-1]
    ranks = centered_ranks(cols)
    np.testing.assert_allclose(ranks[:, 0], np.arange(40) / 39 - 0.5)
    np.testing.assert_allclose(ranks[:, 1], np.arange(40)[::-1] / 39 - 0.5)


def test_directions_drawn_ahead_are_the_on_demand_draws_and_checkpoints_see_none():
    from dqd_ray.roles.es_gradients import ESGradient

    es = ESGradient(0.1, 6, seed=7)
    ref = np.random.default_rng(7)
    theta = np.linspace(-1, 1, 40)
    for _ in range(3):  # each call draws the next one's directions ahead
        points, eps = es.perturb(theta)
        want = ref.standard_normal((3, 40))
        np.testing.assert_array_equal(eps, want)
        np.testing.assert_array_equal(points, np.concatenate([theta + 0.1 * want,
                                                              theta - 0.1 * want]))
    # A checkpoint stores the generator as if nothing was drawn ahead: a restored
    # estimator continues with the same directions.
    restored = ESGradient(0.1, 6, seed=0)
    restored.set_rng(copy.deepcopy(es.checkpoint_rng()))
    np.testing.assert_array_equal(restored.perturb(theta)[1], es.perturb(theta)[1])
    # Directions drawn ahead for another size are undone, not skipped.
    other = es.perturb(theta[:10])[1]
    np.testing.assert_array_equal(other, restored.perturb(theta[:10])[1])


def test_points_written_into_a_float32_batch_are_the_float64_points_rounded_once():
    """``perturb(theta, out=...)`` (how the coordinator builds the genomes the
    rollouts get) gives, bit for bit, the float64 points cast to float32, on
    the first call (drawn on demand) and later ones (drawn ahead), also after
    sigma changes."""
    from dqd_ray.roles.es_gradients import ESGradient

    a, b = ESGradient(0.05, 8, seed=3), ESGradient(0.05, 8, seed=3)
    theta = np.random.default_rng(1).normal(size=257)
    for sigma in (0.05, 0.05, 0.2):
        a.sigma = b.sigma = sigma
        want, eps_a = a.perturb(theta)
        batch = np.full((10, 257), np.nan, np.float32)
        got, eps_b = b.perturb(theta, out=batch[2:])
        assert got.base is batch and np.isnan(batch[:2]).all()  # written in place
        np.testing.assert_array_equal(eps_a, eps_b)
        np.testing.assert_array_equal(batch[2:], want.astype(np.float32))
        np.testing.assert_array_equal(want, np.concatenate([theta + sigma * eps_a,
                                                            theta - sigma * eps_a]))
    with pytest.raises(ValueError, match="shape"):
        b.perturb(theta, out=np.empty((7, 257), np.float32))
