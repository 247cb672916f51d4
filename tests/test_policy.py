"""MLP policies as flat genomes: layout, init and the three forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqd_ray.config import PolicyConfig
from dqd_ray.roles.policy import PolicySpec


def test_qd_ant_genome_dim():
    spec = PolicySpec(28, 8)
    # 28*128 + 128 + 128*128 + 128 + 128*8 + 8
    assert spec.genome_dim == 21256
    assert spec.sizes == [28, 128, 128, 8]
    assert PolicySpec.from_config("QDAntBulletEnv-v0", PolicyConfig()).genome_dim == 21256


def test_genome_dim_formula():
    spec = PolicySpec(5, 3, [7, 4, 2], "relu")
    assert spec.genome_dim == (5 * 7 + 7) + (7 * 4 + 4) + (4 * 2 + 2) + (2 * 3 + 3)
    assert len(spec.layers) == 4


def test_layout_is_weight_then_bias_row_major():
    spec = PolicySpec(3, 2, [4])
    g = np.arange(spec.genome_dim, dtype=np.float32)
    (w1, b1), (w2, b2) = spec.unflatten(g)
    assert w1.shape == (4, 3) and b1.shape == (4,)
    assert w2.shape == (2, 4) and b2.shape == (2,)
    np.testing.assert_array_equal(w1.ravel(), np.arange(12))
    np.testing.assert_array_equal(b1, np.arange(12, 16))
    np.testing.assert_array_equal(w2.ravel(), np.arange(16, 24))
    np.testing.assert_array_equal(b2, np.arange(24, 26))


@pytest.mark.parametrize("spec", [PolicySpec(28, 8), PolicySpec(15, 3, [16, 8], "relu")])
def test_flatten_unflatten_round_trip(spec):
    rng = np.random.default_rng(0)
    g = rng.standard_normal(spec.genome_dim).astype(np.float32)
    layers = spec.unflatten(g)
    np.testing.assert_array_equal(spec.flatten(layers), g)
    # And the other way round.
    again = spec.unflatten(spec.flatten(layers))
    for (w, b), (w2, b2) in zip(layers, again):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)


def test_flatten_rejects_bad_layers():
    spec = PolicySpec(3, 2, [4])
    layers = spec.unflatten(np.zeros(spec.genome_dim, np.float32))
    with pytest.raises(ValueError):
        spec.flatten(layers[:1])
    with pytest.raises(ValueError):
        spec.flatten([(layers[0][0].T, layers[0][1]), layers[1]])


def test_xavier_init():
    spec = PolicySpec(28, 8)
    g = spec.init_genome(np.random.default_rng(1))
    assert g.shape == (21256,) and g.dtype == np.float32
    for (w, b), (_, _, fan_in, fan_out) in zip(spec.unflatten(g), spec.layers):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.all(b == 0.0)
        assert np.all(np.abs(w) <= bound)
        # Uniform on [-bound, bound]: spread over the range, not all zero.
        assert np.abs(w).max() > 0.9 * bound
        assert np.std(w) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    # Seeded: same rng seed, same genome; another seed differs.
    np.testing.assert_array_equal(g, spec.init_genome(np.random.default_rng(1)))
    assert not np.array_equal(g, spec.init_genome(np.random.default_rng(2)))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_forwards_agree(activation):
    spec = PolicySpec(6, 3, [16, 8], activation)
    rng = np.random.default_rng(0)
    genomes = np.stack([spec.init_genome(rng) for _ in range(4)])
    genomes[:, spec.layers[0][1]] = rng.normal(0, 0.5, (4, 16))  # non-zero biases too
    obs = rng.normal(0, 2, (4, 5, 6)).astype(np.float32)

    many = spec.forward_many_np(genomes, obs)
    assert many.shape == (4, 5, 3)
    single = np.stack([spec.forward_np(g, o) for g, o in zip(genomes, obs)])
    assert single.shape == (4, 5, 3)
    t_per_genome = spec.forward_torch(torch.from_numpy(genomes), torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(many, single, atol=1e-6)
    np.testing.assert_allclose(t_per_genome, single, atol=1e-5)

    # Shared observations (S, obs) for every genome in torch.
    shared = spec.forward_torch(torch.from_numpy(genomes), torch.from_numpy(obs[0])).numpy()
    expected = np.stack([spec.forward_np(g, obs[0]) for g in genomes])
    np.testing.assert_allclose(shared, expected, atol=1e-5)

    # One observation per genome (G, obs) in forward_many_np.
    one = spec.forward_many_np(genomes, obs[:, 0])
    assert one.shape == (4, 3)
    np.testing.assert_allclose(one, single[:, 0], atol=1e-6)

    # Different genomes really give different actions.
    assert not np.allclose(single[0], single[1])


def test_forward_matches_manual_computation():
    spec = PolicySpec(4, 2, [5], "relu")
    rng = np.random.default_rng(3)
    g = rng.standard_normal(spec.genome_dim).astype(np.float32)
    obs = rng.standard_normal((7, 4)).astype(np.float32)
    (w1, b1), (w2, b2) = spec.unflatten(g)
    expected = np.tanh(np.maximum(obs @ w1.T + b1, 0) @ w2.T + b2)
    np.testing.assert_allclose(spec.forward_np(g, obs), expected, rtol=1e-5, atol=1e-6)


def test_forward_does_not_modify_inputs():
    spec = PolicySpec(4, 2, [5])
    rng = np.random.default_rng(0)
    g = rng.standard_normal(spec.genome_dim).astype(np.float32)
    obs = rng.standard_normal((3, 4)).astype(np.float32)
    g0, obs0 = g.copy(), obs.copy()
    spec.forward_np(g, obs)
    spec.forward_many_np(g[None], obs[None])
    np.testing.assert_array_equal(g, g0)
    np.testing.assert_array_equal(obs, obs0)


def test_actions_in_unit_box():
    spec = PolicySpec(28, 8)
    rng = np.random.default_rng(0)
    genomes = 50.0 * rng.standard_normal((3, spec.genome_dim)).astype(np.float32)
    obs = rng.uniform(-5, 5, (3, 64, 28)).astype(np.float32)
    for a in (spec.forward_many_np(genomes, obs),
              spec.forward_torch(torch.from_numpy(genomes), torch.from_numpy(obs)).numpy()):
        assert np.all(np.isfinite(a))
        assert a.min() >= -1.0 and a.max() <= 1.0
        # Huge weights saturate the tanh: both ends are reached.
        assert a.min() < -0.99 and a.max() > 0.99


def test_forward_torch_gradients_flow_to_genomes():
    spec = PolicySpec(3, 2, [4])
    g = torch.from_numpy(spec.init_genome(np.random.default_rng(0))[None]).requires_grad_(True)
    out = spec.forward_torch(g, torch.ones(5, 3))
    out.sum().backward()
    assert g.grad is not None and g.grad.shape == g.shape
    assert torch.count_nonzero(g.grad) > 0


def test_wrong_genome_size_raises():
    spec = PolicySpec(28, 8)
    obs = np.zeros((2, 28), np.float32)
    with pytest.raises(ValueError, match="21256"):
        spec.forward_np(np.zeros(21255, np.float32), obs)
    with pytest.raises(ValueError, match="21256"):
        spec.forward_many_np(np.zeros((2, 21257), np.float32), obs)
    with pytest.raises(ValueError):
        spec.unflatten(np.zeros(100, np.float32))
    with pytest.raises(ValueError):
        spec.check(np.zeros(21255))


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        PolicySpec(3, 2, [4], "sigmoid")
