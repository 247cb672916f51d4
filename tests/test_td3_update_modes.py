"""td3.update_mode: the cudagraphs path's static-buffer update against eager
(un-captured, on a CPU; captured where CUDA exists), its warm-up, its noise,
its state, and the refusals of settings that cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqd_ray.config import TD3Config
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.td3 import TD3Ensemble, update_mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS, ACT, NUM_OBJ, B = 3, 2, 3, 32
NETS = ("actor", "critic", "actor_target", "critic_target")

# Why 1e-5: the graph path's Adam is capturable and fused: it computes the bias
# corrections in float32 on the device (eager: in Python doubles) and the moment
# updates in one kernel, so its weights differ from eager's by float32 rounding,
# about 1e-7 after 300 updates of these networks (measured: at most 6e-8 on the
# weights, 5e-7 on losses of order 1). 1e-5 leaves room for that rounding to grow,
# while any logical difference (an actor step missed or added, another noise
# draw, a stale buffer) moves the weights by about the learning rate, 1e-3 here.
TOL = 1e-5


def make_cfg(**kw) -> TD3Config:
    return TD3Config(critic_hidden_sizes=[16], batch_size=B, lr=1e-3, **kw)


def make_batches(rng: np.random.Generator, n: int) -> dict:
    return {"obs": rng.normal(size=(n, B, OBS)).astype(np.float32),
            "action": rng.uniform(-1, 1, (n, B, ACT)).astype(np.float32),
            "reward": rng.normal(size=(n, B, NUM_OBJ)).astype(np.float32),
            "next_obs": rng.normal(size=(n, B, OBS)).astype(np.float32),
            "terminated": (rng.random((n, B)) < 0.3).astype(np.float32)}


def ensembles(cfg: TD3Config, device: str = "cpu", capture: bool = False, **kw):
    """An eager ensemble and the same agents on the cudagraphs path."""
    spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
    eager = TD3Ensemble(spec, NUM_OBJ, cfg, device=device, seed=3, **kw)
    graph_cfg = cfg.model_copy(update={"update_mode": "cudagraphs"})
    static = TD3Ensemble(spec, NUM_OBJ, graph_cfg, device=device, seed=3, capture=capture, **kw)
    return eager, static


def params(ens: TD3Ensemble) -> dict[str, torch.Tensor]:
    return {f"{net}.{name}": p.detach().cpu().clone()
            for net in NETS for name, p in getattr(ens, net).named_parameters()}


def assert_same_agents(a: TD3Ensemble, b: TD3Ensemble, tol: float = TOL) -> None:
    pa, pb = params(a), params(b)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=tol, atol=tol, msg=k)
    assert a.updates == b.updates


def train_both(eager, static, rng, calls=(50, 50, 1, 99, 100)) -> int:
    """Trains both on the same batches, in calls of these sizes, plus one
    train_step: the losses agree every call."""
    for n in calls:
        batches = make_batches(rng, n)
        out_e, out_s = eager.train(batches), static.train(batches)
        assert out_e["updates"] == out_s["updates"] == n
        for key in ("critic_loss", "actor_loss"):
            np.testing.assert_allclose(out_s[key], out_e[key], rtol=TOL, atol=TOL)
    one = {k: v[0] for k, v in make_batches(rng, 1).items()}
    step_e, step_s = eager.train_step(one), static.train_step(one)
    assert set(step_e) == set(step_s)
    for key in step_e:
        np.testing.assert_allclose(step_s[key], step_e[key], rtol=TOL, atol=TOL)
    return sum(calls) + 1


@pytest.mark.parametrize("kw", [
    {},  # delay 2, target noise 0.2
    {"policy_delay": 3, "target_noise": 0.5, "noise_clip": 0.3, "tau": 0.05},
    {"target_noise": 0.0},
    {"objectives": [1, 2]},  # a learner's share of the critics
])
def test_static_buffer_update_trains_the_agents_eager_trains(kw):
    """The step a CUDA graph captures (static buffers, capturable fused Adam, noise
    drawn ahead), run un-captured: 301 updates agree with eager within 1e-5."""
    kw = dict(kw)
    objectives = kw.pop("objectives", None)
    eager, static = ensembles(make_cfg(**kw), objectives=objectives)
    assert static.critic_opt.defaults["capturable"] and static.critic_opt.defaults["fused"]
    assert not eager.critic_opt.defaults["capturable"]
    assert train_both(eager, static, np.random.default_rng(0)) == 301
    assert_same_agents(eager, static)
    # The agents learned: far from where they started, by much more than TOL.
    fresh = ensembles(make_cfg(**kw), objectives=objectives)[0]
    moved = max(float((params(eager)[k] - v).abs().max()) for k, v in params(fresh).items())
    assert moved > 100 * TOL


def test_noise_drawn_for_many_updates_equals_one_update_at_a_time():
    """The graph path draws a whole call's target noise before its updates; each
    agent's stream gives the same numbers as eager's draw per update."""
    a, b = ensembles(make_cfg(target_noise=1.0, noise_clip=0.6))
    ahead = a._noise(5, 7)
    one_by_one = torch.cat([b._noise(1, 7) for _ in range(5)])
    assert ahead.shape == (5, NUM_OBJ, 7, ACT)
    assert torch.equal(ahead, one_by_one)
    assert ahead.abs().max() <= 0.6 and ahead.abs().max() > 0.5  # scaled, clipped
    assert not torch.equal(ahead[:, 0], ahead[:, 1])  # one stream per agent
    assert ensembles(make_cfg(target_noise=0.0))[0]._noise(3, 7) is None


@pytest.mark.parametrize("trained_first", [False, True])
def test_warm_up_before_capture_changes_no_number(trained_first):
    """Capture warms up on the static buffers, then puts back every weight, target,
    Adam moment and step count (or Adam's fresh state): the same run to the bit."""
    _, warmed = ensembles(make_cfg())
    _, plain = ensembles(make_cfg())
    rng_w, rng_p = np.random.default_rng(1), np.random.default_rng(1)
    if trained_first:
        warmed.train(make_batches(rng_w, 5))
        plain.train(make_batches(rng_p, 5))
    else:
        warmed._static._allocate(B)
    before = params(warmed)
    warmed._static.warm_up()
    assert all(torch.equal(params(warmed)[k], v) for k, v in before.items())
    for _ in range(2):
        out_w, out_p = warmed.train(make_batches(rng_w, 6)), plain.train(make_batches(rng_p, 6))
        np.testing.assert_array_equal(out_w["critic_loss"], out_p["critic_loss"])
    pw, pp = params(warmed), params(plain)
    assert all(torch.equal(pw[k], pp[k]) for k in pw)
    for opt in ("actor_opt", "critic_opt"):
        sw, sp = getattr(warmed, opt).state_dict(), getattr(plain, opt).state_dict()
        for i, st in sp["state"].items():
            for key, v in st.items():
                assert torch.equal(sw["state"][i][key], v), (opt, i, key)


def test_state_moves_between_eager_and_the_graph_path():
    """A checkpoint of either path restores into the other (Adam's step count
    moves between host and device) and training goes on the same; a restore
    drops captured graphs (the optimizers hold new tensors)."""
    rng = np.random.default_rng(2)
    eager, static = ensembles(make_cfg(policy_delay=3))
    eager.train(make_batches(rng, 7))
    static.load_state_dict(eager.state_dict())
    static._static.graphs = {"stale": None}
    static.load_state_dict(eager.state_dict())
    assert static._static.graphs is None
    train_both(eager, static, rng, calls=(20,))
    back, _ = ensembles(make_cfg(policy_delay=3))
    back.load_state_dict(static.state_dict())
    train_both(eager, back, rng, calls=(10,))
    assert_same_agents(eager, back)


def test_update_mode_settings():
    assert TD3Config().update_mode == "eager" and update_mode(TD3Config()) == "eager"
    assert update_mode(TD3Config(compile=True)) == "compile"  # the older switch
    assert update_mode(TD3Config(update_mode="cudagraphs")) == "cudagraphs"
    with pytest.raises(ValueError, match="td3.compile=true and td3.update_mode=cudagraphs"):
        TD3Config(compile=True, update_mode="cudagraphs")
    with pytest.raises(ValueError, match="update_mode"):
        TD3Config(update_mode="graphs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cudagraphs_without_cuda_stops_the_learner_with_what_to_do():
    from dqd_ray.roles.learner import Learner

    cfg = make_cfg(update_mode="cudagraphs")
    spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
    for device in ("cpu", "auto"):  # "auto": a GPU learner that found no GPU
        with pytest.raises(RuntimeError, match=r"td3\.update_mode=cudagraphs needs a CUDA GPU"
                                               r".*num_gpus_per_learner.*td3\.update_mode=eager"):
            Learner(spec, NUM_OBJ, cfg, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_captured_graphs_train_the_agents_eager_trains_on_cuda():
    eager, graphed = ensembles(make_cfg(), device="cuda", capture=True)
    rng = np.random.default_rng(0)
    graphed.train(make_batches(rng, 1))
    eager.train(make_batches(np.random.default_rng(0), 1))
    graphs = graphed._static.graphs
    assert set(graphs) == {False, True}
    train_both(eager, graphed, rng)
    assert graphed._static.graphs is graphs  # captured once, replayed since
    assert_same_agents(eager, graphed)
    graphed.load_state_dict(eager.state_dict())  # recaptured on the next update
    train_both(eager, graphed, rng, calls=(20,))
    assert graphed._static.graphs is not graphs
    assert_same_agents(eager, graphed)
