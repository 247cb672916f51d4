"""The stacked TD3 ensemble on tiny networks: jacobians, equivalence with
independent agents, targets, greedy genomes, state and learning."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from dqd_ray.config import TD3Config
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.td3 import TD3Ensemble

pytestmark = pytest.mark.usefixtures("one_torch_thread")


OBS, ACT = 3, 2
NUM_OBJ = 3  # fitness + 2 measures


def make_spec() -> PolicySpec:
    return PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])


def make_cfg(**kw) -> TD3Config:
    return TD3Config(critic_hidden_sizes=[16], batch_size=32, **kw)


def make_batch(rng: np.random.Generator, n: int = 32, terminated: float | None = None) -> dict:
    term = (rng.random(n) < 0.3) if terminated is None else np.full(n, terminated)
    return {
        "obs": rng.normal(size=(n, OBS)).astype(np.float32),
        "action": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
        "reward": rng.normal(size=(n, NUM_OBJ)).astype(np.float32),
        "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
        "terminated": term.astype(np.float32),
    }


def stack_batches(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def genomes_for(spec: PolicySpec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.stack([spec.init_genome(rng) for _ in range(n)])
    g += rng.normal(0, 0.1, g.shape).astype(np.float32)  # non-zero biases
    return g


def q1_objective(ens: TD3Ensemble, j: int, genome, states, dtype=torch.float64) -> float:
    """f_j(theta) = mean_s Q1_j(s, pi_theta(s)), computed directly."""
    critic = copy.deepcopy(ens.critic).to(dtype)
    with torch.no_grad():
        s = torch.as_tensor(states, dtype=dtype)
        theta = torch.as_tensor(np.asarray(genome), dtype=dtype)[None]
        act = ens.spec.forward_torch(theta, s)[0]  # (S, A)
        x = torch.cat([s, act], dim=-1)[None]  # (1, S, in)
        q = critic(x, select=slice(2 * j, 2 * j + 1))  # model 2j is agent j's Q1
        return float(q.mean())


def trained_ensemble(seed: int = 0, steps: int = 5, **cfg_kw) -> TD3Ensemble:
    ens = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(**cfg_kw), seed=seed)
    rng = np.random.default_rng(seed + 100)
    ens.train(stack_batches([make_batch(rng) for _ in range(steps)]))
    return ens


def all_params(ens: TD3Ensemble) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for pname, p in getattr(ens, name).named_parameters():
            out[f"{name}.{pname}"] = p.detach().clone()
    return out


# -- jacobian ------------------------------------------------------------------


def test_jacobian_matches_central_finite_differences():
    ens = trained_ensemble()
    spec = ens.spec
    states = np.random.default_rng(1).normal(size=(16, OBS)).astype(np.float32)
    genomes = genomes_for(spec, 2)
    jac = ens.jacobian(genomes, states)
    assert jac.shape == (2, NUM_OBJ, spec.genome_dim)
    assert jac.dtype == np.float64

    eps = 1e-4  # in float64
    for g in range(2):
        for j in range(NUM_OBJ):
            fd = np.empty(spec.genome_dim)
            base = genomes[g].astype(np.float64)
            for d in range(spec.genome_dim):
                plus, minus = base.copy(), base.copy()
                plus[d] += eps
                minus[d] -= eps
                fd[d] = (q1_objective(ens, j, plus, states)
                         - q1_objective(ens, j, minus, states)) / (2 * eps)
            scale = np.abs(fd).max()
            assert scale > 1e-3  # a real, non-trivial gradient
            np.testing.assert_allclose(jac[g, j], fd, rtol=1e-3, atol=2e-4 * scale)
            cos = jac[g, j] @ fd / (np.linalg.norm(jac[g, j]) * np.linalg.norm(fd))
            assert cos > 0.9999


def test_jacobian_rows_are_per_genome_and_objective():
    ens = trained_ensemble()
    states = np.random.default_rng(2).normal(size=(8, OBS)).astype(np.float32)
    genomes = genomes_for(ens.spec, 3, seed=4)
    jac = ens.jacobian(genomes, states)
    # Each genome's rows equal the jacobian of that genome alone.
    for g in range(3):
        np.testing.assert_allclose(ens.jacobian(genomes[g:g + 1], states)[0], jac[g],
                                   rtol=1e-5, atol=1e-7)
    # Objectives have distinct critics, so distinct rows.
    assert not np.allclose(jac[0, 0], jac[0, 1])
    with pytest.raises(ValueError):
        ens.jacobian(np.zeros((1, ens.spec.genome_dim + 1), np.float32), states)


def test_jacobian_in_state_chunks_equals_one_pass():
    ens = trained_ensemble()
    states = np.random.default_rng(6).normal(size=(37, OBS)).astype(np.float32)
    genomes = genomes_for(ens.spec, 2, seed=7)
    whole = ens.jacobian(genomes, states)
    # 2 genomes x 5 states per chunk: 8 chunks, the last one partial.
    chunked = ens.jacobian(genomes, states, chunk_rows=10)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)
    assert np.abs(whole).max() > 1e-3


def test_gradient_step_increases_q():
    ens = trained_ensemble()
    states = np.random.default_rng(3).normal(size=(32, OBS)).astype(np.float32)
    genomes = genomes_for(ens.spec, 2, seed=5)
    jac = ens.jacobian(genomes, states)
    for g in range(2):
        for j in range(NUM_OBJ):
            before = q1_objective(ens, j, genomes[g], states)
            after = q1_objective(ens, j, genomes[g] + 1e-2 * jac[g, j], states)
            down = q1_objective(ens, j, genomes[g] - 1e-2 * jac[g, j], states)
            assert after > before > down


# -- the ensemble is k+1 independent agents -------------------------------------


def _copy_agent(big: TD3Ensemble, small: TD3Ensemble, j: int) -> None:
    with torch.no_grad():
        for name in ("actor", "actor_target"):
            src, dst = getattr(big, name), getattr(small, name)
            for ps, pd in zip(src.parameters(), dst.parameters()):
                pd.copy_(ps[j:j + 1])
        for name in ("critic", "critic_target"):
            src, dst = getattr(big, name), getattr(small, name)
            for ps, pd in zip(src.parameters(), dst.parameters()):
                pd.copy_(ps[2 * j:2 * j + 2])


def test_ensemble_equals_independent_agents():
    cfg = make_cfg(target_noise=0.0, policy_delay=2, tau=0.05, lr=1e-3)
    spec = make_spec()
    big = TD3Ensemble(spec, NUM_OBJ, cfg, seed=0, objectives=[0, 1, 2])
    smalls = []
    for j in range(NUM_OBJ):
        small = TD3Ensemble(spec, NUM_OBJ, cfg, seed=10 + j, objectives=[j])
        _copy_agent(big, small, j)
        smalls.append(small)

    rng = np.random.default_rng(0)
    batches = stack_batches([make_batch(rng) for _ in range(6)])
    out_big = big.train(batches)
    outs = [s.train(batches) for s in smalls]
    assert out_big["updates"] == 6
    for j, (small, out) in enumerate(zip(smalls, outs)):
        assert small.updates == big.updates == 6
        np.testing.assert_allclose(out["critic_loss"][0], out_big["critic_loss"][j], rtol=1e-5)
        np.testing.assert_allclose(out["actor_loss"][0], out_big["actor_loss"][j], rtol=1e-5)
        for name in ("actor", "actor_target"):
            for pb, ps in zip(getattr(big, name).parameters(), getattr(small, name).parameters()):
                torch.testing.assert_close(ps[0], pb[j], atol=1e-5, rtol=0)
        for name in ("critic", "critic_target"):
            for pb, ps in zip(getattr(big, name).parameters(), getattr(small, name).parameters()):
                torch.testing.assert_close(ps, pb[2 * j:2 * j + 2], atol=1e-5, rtol=0)
        # The actors really moved (policy_delay 2 with 6 updates: 3 actor steps).
        np.testing.assert_allclose(small.greedy_genome(0), big.greedy_genome(j), atol=1e-5)
    fresh = TD3Ensemble(spec, NUM_OBJ, cfg, seed=0)
    assert not np.allclose(fresh.greedy_genome(0), big.greedy_genome(0), atol=1e-4)


# -- critic targets ----------------------------------------------------------------


def _expected_critic_loss(ens: TD3Ensemble, batch: dict) -> np.ndarray:
    """Per-agent sum over twins of mean (Q - y)^2, y = r + gamma (1 - d) min Q'(s', pi'(s'))."""
    e = ens.num_agents
    with torch.no_grad():
        obs = torch.as_tensor(batch["obs"])
        act = torch.as_tensor(batch["action"])
        nxt = torch.as_tensor(batch["next_obs"])
        losses = []
        for j, obj in enumerate(ens.objectives):
            a_next = ens.actor_target(nxt[None].expand(e, -1, -1))[j]
            x_next = torch.cat([nxt, a_next], -1)[None]
            q_next = torch.minimum(
                ens.critic_target(x_next, select=slice(2 * j, 2 * j + 1))[0, :, 0],
                ens.critic_target(x_next, select=slice(2 * j + 1, 2 * j + 2))[0, :, 0])
            r = torch.as_tensor(batch["reward"][:, obj])
            d = torch.as_tensor(batch["terminated"])
            y = r + ens.cfg.gamma * (1 - d) * q_next
            x = torch.cat([obs, act], -1)[None]
            q1 = ens.critic(x, select=slice(2 * j, 2 * j + 1))[0, :, 0]
            q2 = ens.critic(x, select=slice(2 * j + 1, 2 * j + 2))[0, :, 0]
            losses.append(float(((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()))
            if float(d.min()) == 1.0:
                # Terminated everywhere: the target is the reward alone.
                torch.testing.assert_close(y, r)
    return np.array(losses)


@pytest.mark.parametrize("terminated", [0.0, 1.0])
def test_critic_target_bootstraps_unless_terminated(terminated):
    cfg = make_cfg(target_noise=0.0, gamma=0.99)
    rng = np.random.default_rng(7)
    batch = make_batch(rng, terminated=terminated)
    ens = trained_ensemble(seed=1, steps=4, target_noise=0.0, gamma=0.99)
    expected = _expected_critic_loss(ens, batch)
    got = ens.train_step(batch)["critic_loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    # Changing next_obs changes the loss only when the episode did not terminate.
    a = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=3)
    b = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=3)
    other = dict(batch, next_obs=batch["next_obs"] + 3.0)
    la, lb = a.train_step(batch)["critic_loss"], b.train_step(other)["critic_loss"]
    if terminated:
        np.testing.assert_array_equal(la, lb)
    else:
        assert np.all(np.abs(la - lb) > 1e-6)


def test_terminated_target_is_reward_only():
    """With terminated=1, the pre-update loss is exactly sum_twins mean (Q - r)^2."""
    ens = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=0)
    batch = make_batch(np.random.default_rng(0), terminated=1.0)
    with torch.no_grad():
        x = torch.as_tensor(np.concatenate([batch["obs"], batch["action"]], 1))
        q = ens.critic(x[None].expand(2 * NUM_OBJ, -1, -1))[..., 0]  # (2E, B)
        r = torch.as_tensor(batch["reward"]).T.repeat_interleave(2, 0)  # (2E, B)
        expected = ((q - r) ** 2).mean(1).reshape(NUM_OBJ, 2).sum(1).numpy()
    np.testing.assert_allclose(ens.train_step(batch)["critic_loss"], expected, rtol=1e-5)


# -- greedy genome ------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_greedy_genome_is_the_actor(activation):
    spec = PolicySpec(OBS, ACT, [8, 4], activation)
    ens = TD3Ensemble(spec, NUM_OBJ, make_cfg(), seed=0)
    ens.train(stack_batches([make_batch(np.random.default_rng(i)) for i in range(4)]))
    obs = np.random.default_rng(9).normal(size=(20, OBS)).astype(np.float32)
    with torch.no_grad():
        actor_out = ens.actor(torch.as_tensor(obs)[None].expand(NUM_OBJ, -1, -1)).numpy()
    for j in range(NUM_OBJ):
        g = ens.greedy_genome(j)
        assert g.shape == (spec.genome_dim,) and g.dtype == np.float32
        spec.check(g)
        np.testing.assert_allclose(spec.forward_np(g, obs), actor_out[j], atol=1e-5)
    assert not np.allclose(ens.greedy_genome(0), ens.greedy_genome(1))


# -- state ----------------------------------------------------------------------------


def _serialized(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("through_bytes", [True, False])
def test_state_round_trip(through_bytes):
    ens = trained_ensemble(seed=0, steps=3)  # odd: next step is an actor step
    state = ens.state_dict()
    if through_bytes:
        state = _serialized(state)
    restored = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=42)
    restored.load_state_dict(state)
    assert restored.updates == ens.updates == 3
    for k, v in all_params(ens).items():
        torch.testing.assert_close(all_params(restored)[k], v, atol=0, rtol=0)

    rng = np.random.default_rng(11)
    for _ in range(4):
        batch = make_batch(rng)
        a, b = ens.train_step(batch), restored.train_step(batch)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for k, v in all_params(ens).items():
        torch.testing.assert_close(all_params(restored)[k], v, atol=0, rtol=0)


def test_state_dict_is_a_snapshot():
    ens = trained_ensemble(seed=0, steps=2)
    state = ens.state_dict()
    snapshot = {k: v.clone() for k, v in state["critic"].items()}
    ens.train(stack_batches([make_batch(np.random.default_rng(1)) for _ in range(3)]))
    for k, v in state["critic"].items():
        torch.testing.assert_close(v, snapshot[k], atol=0, rtol=0)


def test_state_for_other_objectives_rejected():
    ens = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=0)
    other = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=0, objectives=[1, 2])
    with pytest.raises(ValueError, match="objectives"):
        other.load_state_dict(ens.state_dict())


# -- learning -------------------------------------------------------------------------


def test_critic_loss_falls_on_fixed_data():
    rng = np.random.default_rng(0)
    n = 256
    obs = rng.normal(size=(n, OBS)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, ACT)).astype(np.float32)
    reward = np.stack([obs[:, 0] + act[:, 0], np.abs(obs[:, 1]), act[:, 1] ** 2], 1)
    data = {"obs": obs, "action": act, "reward": reward.astype(np.float32),
            "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
            "terminated": (rng.random(n) < 0.5).astype(np.float32)}
    ens = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(lr=3e-3, gamma=0.5), seed=0)
    idx = rng.integers(0, n, size=(400, 32))
    batches = {k: v[idx] for k, v in data.items()}
    losses = [ens.train_step({k: v[i] for k, v in batches.items()})["critic_loss"]
              for i in range(400)]
    losses = np.array(losses)  # (steps, agents)
    assert np.all(np.isfinite(losses))
    first, last = losses[:20].mean(0), losses[-20:].mean(0)
    assert np.all(last < 0.5 * first), (first, last)


def test_train_reports_per_agent_losses():
    ens = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(policy_delay=3), seed=0)
    rng = np.random.default_rng(0)
    out = ens.train(stack_batches([make_batch(rng) for _ in range(2)]))
    assert out["updates"] == 2
    assert out["critic_loss"].shape == (NUM_OBJ,)
    assert np.all(np.isnan(out["actor_loss"]))  # no actor step yet (delay 3)
    out = ens.train(stack_batches([make_batch(rng)]))
    assert np.all(np.isfinite(out["actor_loss"]))


def _bandit(rng: np.random.Generator, targets: np.ndarray, n: int) -> dict:
    """One-step task: every transition ends; objective j rewards actions near
    ``tanh(s @ targets[j])``, so agent j's best policy is known."""
    obs = rng.normal(size=(n, OBS)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, ACT)).astype(np.float32)
    reward = np.stack([_bandit_reward(obs, act, w) for w in targets], axis=1)
    return {"obs": obs, "action": act, "reward": reward.astype(np.float32),
            "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
            "terminated": np.ones(n, np.float32)}


def _bandit_reward(obs, act, w):
    return -((act - 0.8 * np.tanh(obs @ w)) ** 2).sum(axis=1)


def test_greedy_actors_climb_their_q_and_solve_a_bandit():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(NUM_OBJ, OBS, ACT))
    data = _bandit(rng, targets, 4096)
    cfg = TD3Config(critic_hidden_sizes=[64, 64], batch_size=128, lr=3e-3, target_noise=0.0)
    ens = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=0)
    test_obs = rng.normal(size=(512, OBS)).astype(np.float32)
    initial = [ens.greedy_genome(j) for j in range(NUM_OBJ)]
    idx = rng.integers(0, len(data["obs"]), size=(1000, cfg.batch_size))
    ens.train({k: v[idx] for k, v in data.items()})
    random_policy = _bandit_reward(test_obs, rng.uniform(-1, 1, (512, ACT)), targets[0]).mean()
    for j in range(NUM_OBJ):
        trained = ens.greedy_genome(j)
        # Under the learned critic, the trained actor scores above its start...
        q_start, q_end = (q1_objective(ens, j, g, test_obs) for g in (initial[j], trained))
        assert q_end > q_start + 0.1, (j, q_start, q_end)
        # ... and so it does on the task itself, close to the best possible (0).
        r_start, r_end = (_bandit_reward(test_obs, ens.spec.forward_np(g, test_obs), targets[j])
                          .mean() for g in (initial[j], trained))
        assert r_end > r_start + 0.1, (j, r_start, r_end)
        assert r_end > 0.1 * random_policy, (j, r_end, random_policy)


def _target_probe(ens: TD3Ensemble) -> None:
    """Makes every agent's TD target equal its smoothed target action's first
    coordinate: target actors output 0, target critics compute a_0, and the
    online critics output 0 (so the critic loss is 2 * target^2)."""
    with torch.no_grad():
        ens.actor_target.weights[-1].zero_()
        ens.actor_target.biases[-1].zero_()
        w0, b0 = ens.critic_target.weights[0], ens.critic_target.biases[0]
        w0.zero_()
        b0.zero_()
        w0[:, OBS, 0] = 1.0  # hidden unit 0 = relu(a_0 + 2) = a_0 + 2 for |a_0| <= 1
        b0[:, 0, 0] = 2.0
        w1, b1 = ens.critic_target.weights[1], ens.critic_target.biases[1]
        w1.zero_()
        w1[:, 0, 0] = 1.0
        b1.fill_(-2.0)
        ens.critic.weights[-1].zero_()
        ens.critic.biases[-1].zero_()


@pytest.mark.parametrize("noise, clip", [(0.2, 0.5), (1.0, 0.3)])
def test_target_smoothing_noise_is_scaled_and_clipped(noise, clip):
    cfg = TD3Config(critic_hidden_sizes=[16], batch_size=1, gamma=1.0, target_noise=noise,
                    noise_clip=clip, policy_delay=10**9)  # no actor or target update
    ens = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=0)
    _target_probe(ens)
    online = copy.deepcopy(ens.critic.state_dict())
    rng = np.random.default_rng(0)
    targets = []
    for _ in range(500):
        batch = make_batch(rng, n=1, terminated=0.0)
        batch["reward"][:] = 0.0
        loss = ens.train_step(batch)["critic_loss"]
        targets.append(np.sqrt(loss / 2))  # |target| of each agent
        ens.critic.load_state_dict(online)  # undo the update: keep probing
    targets = np.concatenate(targets)
    assert targets.max() <= clip + 1e-5, "target smoothing noise escaped its clip"
    expected = np.sqrt(np.mean(np.clip(rng.normal(0, noise, 10**6), -clip, clip) ** 2))
    rms = np.sqrt(np.mean(targets ** 2))
    assert rms == pytest.approx(expected, rel=0.1), (rms, expected)


def test_an_agent_does_not_depend_on_which_ensemble_holds_it():
    """Critics split between learners are the same agents as in one ensemble."""
    cfg = make_cfg(policy_delay=2)
    whole = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=3)
    parts = [TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=3, objectives=objs)
             for objs in ([0, 1], [2])]
    rng = np.random.default_rng(0)
    batches = stack_batches([make_batch(rng) for _ in range(6)])
    out_whole = whole.train(batches)
    outs = [p.train(batches) for p in parts]
    np.testing.assert_allclose(np.concatenate([o["critic_loss"] for o in outs]),
                               out_whole["critic_loss"], rtol=1e-5)
    genomes, states = genomes_for(whole.spec, 2), rng.normal(size=(16, OBS))
    jac = whole.jacobian(genomes, states)
    for part in parts:
        np.testing.assert_allclose(part.jacobian(genomes, states), jac[:, part.objectives],
                                   rtol=1e-4, atol=1e-7)
        for i, j in enumerate(part.objectives):
            np.testing.assert_allclose(part.greedy_genome(i), whole.greedy_genome(j), atol=1e-6)


def test_actor_update_is_one_adam_step_up_q1_at_the_configured_rate():
    """The actor step ascends each agent's Q1 (not Q2, not descending), with
    Adam at td3.lr: a first Adam step moves every weight by lr * sign(grad)."""
    cfg = make_cfg(policy_delay=1, lr=1e-3 / 7)
    ens = TD3Ensemble(make_spec(), NUM_OBJ, cfg, seed=0)
    with torch.no_grad():  # make Q2 differ from Q1 a lot: a step up Q2 would not match
        for w in ens.critic.weights:
            w[1::2] *= -3.0
    before = copy.deepcopy(ens.actor)
    critic_before = [p.detach().clone() for p in ens.critic.parameters()]
    batch = make_batch(np.random.default_rng(0))
    ens.train_step(batch)  # critic step, then the actor step against the new critic
    for p_old, p_new in zip(critic_before, ens.critic.parameters()):  # critics: Adam at td3.lr
        step = (p_new - p_old).detach().abs()
        moved = step > cfg.lr / 10
        assert moved.float().mean() > 0.5
        torch.testing.assert_close(step[moved], torch.full_like(step[moved], cfg.lr), rtol=1e-2,
                                   atol=0)
    obs = torch.as_tensor(batch["obs"]).unsqueeze(0).expand(NUM_OBJ, -1, -1)
    pi = before(obs)
    q1 = ens.critic(torch.cat([obs, pi], dim=-1), select=slice(0, 2 * NUM_OBJ, 2))
    grads = torch.autograd.grad(q1.squeeze(-1).mean(dim=1).sum(), list(before.parameters()))
    for p_old, p_new, g in zip(before.parameters(), ens.actor.parameters(), grads):
        step = (p_new - p_old).detach()
        big = g.abs() > 1e-5
        assert big.any()
        torch.testing.assert_close(step[big], cfg.lr * torch.sign(g[big]), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("init", ["xavier", "torch"])
def test_stacked_mlp_initialization(init):
    from dqd_ray.roles.td3 import StackedMLP

    sizes = [40, 60, 20]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    net = StackedMLP(3, sizes, "relu", None, init, gens)
    for (fi, fo), w, b in zip(zip(sizes[:-1], sizes[1:]), net.weights, net.biases):
        assert w.shape == (3, fi, fo) and b.shape == (3, 1, fo)
        bound = math.sqrt(6.0 / (fi + fo)) if init == "xavier" else 1.0 / math.sqrt(fi)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform
        if init == "xavier":
            assert torch.all(b == 0)
        else:
            assert b.abs().max() <= bound and b.std().item() == pytest.approx(
                bound / math.sqrt(3), rel=0.25)
        assert not torch.equal(w[0], w[1])  # one stream per model
    again = StackedMLP(3, sizes, "relu", None, init,
                       [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_same_seed_same_ensemble_other_seed_other_ensemble():
    a, b, c = (TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=s) for s in (4, 4, 5))
    batches = stack_batches([make_batch(np.random.default_rng(0)) for _ in range(3)])
    for ens in (a, b, c):
        ens.train(batches)  # target noise included
    pa, pb, pc = all_params(a), all_params(b), all_params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not any(torch.equal(pa[k], pc[k]) for k in pa if "weights" in k)


def test_batches_moved_ahead_train_like_host_arrays_and_one_step_at_a_time():
    """train() moves all its batches to the device in one copy per array and keeps
    the losses there until the end; moving them ahead (to_device, as a learner
    does with staged batches on a GPU) or updating one batch at a time gives the
    same agents and losses."""
    rng = np.random.default_rng(11)
    batches = stack_batches([make_batch(rng) for _ in range(6)])
    a, b, c = (TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=3) for _ in range(3))
    out_a = a.train(batches)
    out_b = b.train(b.to_device(batches))
    steps = [c.train_step({k: v[i] for k, v in batches.items()}) for i in range(6)]
    for name, pa in all_params(a).items():
        assert torch.equal(pa, all_params(b)[name]) and torch.equal(pa, all_params(c)[name])
    np.testing.assert_array_equal(out_a["critic_loss"], out_b["critic_loss"])
    np.testing.assert_array_equal(out_a["critic_loss"],
                                  np.mean([s["critic_loss"] for s in steps], axis=0))
    assert out_a["updates"] == 6 and isinstance(steps[0]["critic_loss"], np.ndarray)
    assert a.updates == b.updates == c.updates == 6


@pytest.mark.slow
def test_compiled_update_trains_the_same_agents_as_eager_ones():
    """td3.update_mode=compile reaches the ensemble: its whole update step (losses,
    backward, Adam, soft update) runs through torch.compile (td3.compile=true is the
    same), and the agents it trains match the eager ones (to float rounding of fused
    kernels). Compiling takes about a minute on a 2-core CPU."""
    rng = np.random.default_rng(12)
    batches = stack_batches([make_batch(rng) for _ in range(4)])
    eager = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(), seed=5)
    comp = TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(update_mode="compile"), seed=5)
    assert comp._update is not comp._update_eager  # the compiled wrapper
    assert eager._update == eager._update_eager
    assert TD3Ensemble(make_spec(), NUM_OBJ, make_cfg(compile=True), seed=5).mode == "compile"
    out_e, out_c = eager.train(batches), comp.train(batches)
    np.testing.assert_allclose(out_c["critic_loss"], out_e["critic_loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out_c["actor_loss"], out_e["actor_loss"], rtol=1e-4, atol=1e-6)
    for name, p in all_params(eager).items():
        torch.testing.assert_close(all_params(comp)[name], p, rtol=1e-4, atol=1e-5)
