"""A checkpoint's state is captured in milliseconds and gathered later: each
role keeps a copy of its own state as of the capture (the big arrays copied
while the next iteration runs), and what the writer gathers is exactly what
the role's ``state_dict`` said at the capture, whatever ran in between."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dqd_ray.bench.sphere import make_coordinator
from dqd_ray.config import TD3Config
from dqd_ray.roles.learner import Learner
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.replay import FIELDS, ReplayBuffer
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state.statecodec import StateError
from dqd_ray.state.writer import CaptureLost, CheckpointWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS, ACT, REW = 5, 2, 3


def _chunk(rng, n: int) -> dict:
    return {"obs": rng.normal(size=(n, OBS)).astype(np.float32),
            "action": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
            "reward": rng.normal(size=(n, REW)).astype(np.float32),
            "next_obs": rng.normal(size=(n, OBS)).astype(np.float32),
            "terminated": (rng.random(n) < 0.1).astype(np.float32)}


def _same_replay_state(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "data"} == \
        {k: v for k, v in b.items() if k != "data"}
    assert set(a["data"]) == set(b["data"]) == set(FIELDS)
    for k in FIELDS:
        np.testing.assert_array_equal(a["data"][k], b["data"][k])


@pytest.mark.parametrize("filled", [300, 1000])  # part full; full (the next adds overwrite)
def test_replay_capture_is_the_state_of_its_moment_after_appends_and_samples(filled):
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(OBS, ACT, REW, capacity=1000, seed=1)
    buf.add(_chunk(rng, filled))
    expected = buf.state_dict()
    buf.capture_state()
    buf.sample(16, 4)  # moves the buffer's own RNG: the capture keeps the old state
    for _ in range(5):
        buf.add(_chunk(rng, 150))  # overwrites the oldest rows once the ring is full
    buf.add(_chunk(rng, 40), key=(0,))
    buf.commit()
    got = buf.captured_state()
    _same_replay_state(got, expected)
    assert buf.state_dict()["total_added"] == filled + 790  # the live buffer moved on
    with pytest.raises(RuntimeError, match="without capture_state"):
        buf.captured_state()  # handed over once
    # Restored into a fresh buffer it samples exactly as the buffer did at the capture.
    fresh = ReplayBuffer(OBS, ACT, REW, capacity=1000, seed=99)
    fresh.load_state_dict(got)
    again = ReplayBuffer(OBS, ACT, REW, capacity=1000, seed=99)
    again.load_state_dict(expected)
    a, b = fresh.sample(8, 2), again.sample(8, 2)
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k])


def test_replay_capture_gathered_from_another_thread_while_appends_run():
    rng = np.random.default_rng(2)
    buf = ReplayBuffer(OBS, ACT, REW, capacity=5000, seed=1)
    buf.add(_chunk(rng, 5000))
    expected = buf.state_dict()
    chunks = [_chunk(rng, 97) for _ in range(200)]  # 4 ring turns' worth of overwrites
    buf.capture_state()
    got: dict = {}
    gather = threading.Thread(target=lambda: got.update(buf.captured_state()))
    gather.start()
    for c in chunks:
        buf.add(c)
    gather.join(30)
    assert not gather.is_alive()
    _same_replay_state(got, expected)


def test_replay_capture_without_data_holds_the_counters_and_rng_only():
    rng = np.random.default_rng(3)
    buf = ReplayBuffer(OBS, ACT, REW, capacity=100, seed=1)
    buf.add(_chunk(rng, 50))
    buf.capture_state(include_data=False)
    buf.add(_chunk(rng, 10))
    got = buf.captured_state()
    assert "data" not in got and got == buf.state_dict(include_data=False) | {
        "pos": 50, "size": 50, "total_added": 50}


def _coordinator_states_equal(a: dict, b: dict) -> None:
    assert a["tree"] == b["tree"]
    assert set(a["arrays"]) == set(b["arrays"])
    for k, v in a["arrays"].items():
        assert v.dtype == b["arrays"][k].dtype
        np.testing.assert_array_equal(v, b["arrays"][k])


@pytest.mark.parametrize("gather", ["after", "during"])
def test_coordinator_capture_is_its_state_dict_of_that_moment(gather):
    coord = make_coordinator(dim=12)
    for _ in range(3):
        coord.iteration()
    expected, archive = coord.state_dict(), coord.archive_arrays()
    coord.capture_state()
    got: dict = {}
    if gather == "during":  # the writer's thread gathers while the iteration runs
        thread = threading.Thread(target=lambda: got.update(coord.captured_state()))
        thread.start()
        coord.iteration()
        thread.join(30)
        assert not thread.is_alive()
    else:  # the iteration copies the cells before it tells anything
        before = len(coord.archive)
        coord.iteration()
        assert len(coord.archive) > before  # the archive did change since the capture
        got = coord.captured_state()
    _coordinator_states_equal(got["coordinator"], expected)
    assert set(got["archive"]) == set(archive)
    for k, v in archive.items():
        np.testing.assert_array_equal(got["archive"][k], v)
    # The captured state restores to the coordinator as it was.
    other = make_coordinator(dim=12)
    other.load_state_dict(got["coordinator"])
    _coordinator_states_equal(other.state_dict(), expected)


def test_an_archive_changed_behind_the_capture_is_refused_not_mixed():
    coord = make_coordinator(dim=12)
    coord.iteration()
    coord.capture_state()
    updates = list(coord.archive._store._props["updates"])
    sol = np.full((1, 12), 0.5)
    status = coord.archive.add(solution=sol, objective=np.array([1e9]),  # beats any elite
                               measures=np.array([[0.1, 0.1]]), seed=np.array([7]))["status"]
    assert status[0] > 0 and coord.archive._store._props["updates"] != updates
    with pytest.raises(StateError, match="changed between the capture"):
        coord.captured_state()


def test_learner_capture_is_a_copy_that_training_does_not_touch():
    spec = PolicySpec(obs_dim=OBS, act_dim=ACT, hidden_sizes=[8])
    buf = ReplayBuffer(OBS, ACT, REW, capacity=2000, seed=0)
    buf.add(_chunk(np.random.default_rng(0), 1500))
    cfg = TD3Config(critic_hidden_sizes=[16], batch_size=32, learning_starts=100)
    lr = Learner(spec, REW, cfg, buf, seed=3)
    lr.train(20)
    expected = _tensors(lr.state_dict())
    expected = {k: v.clone() for k, v in expected.items()}
    lr.capture_state()
    lr.train(20)
    got, live = _tensors(lr.captured_state()), _tensors(lr.state_dict())
    assert set(got) == set(expected) and len(got) > 10
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert sum(not torch.equal(live[k], v) for k, v in expected.items()) > 0  # it trained


def _tensors(x, path: str = "") -> dict:
    """Every tensor of a nested state, by its path."""
    if isinstance(x, torch.Tensor):
        return {path: x}
    out = {}
    items = x.items() if isinstance(x, dict) else enumerate(x) \
        if isinstance(x, (list, tuple)) else ()
    for k, v in items:
        out.update(_tensors(v, f"{path}/{k}"))
    return out


def test_a_capture_lost_to_a_role_restart_skips_that_checkpoint_only(tmp_path, capsys):
    writer = CheckpointWriter(tmp_path / "checkpoints", {"x": 1}, keep=3,
                              write=lambda root, it, state, cfg, keep: _write(root, it))
    writer.submit(1, lambda: {"ok": True})
    assert writer.wait()["iteration"] == 1

    def lost():
        raise CaptureLost("a role did not hand over its captured state (restarted)")

    path = writer.submit(2, lost)
    writer._thread.join(10)
    first_write_s = writer.records[0]["write_s"]
    assert writer.last_write_s == first_write_s  # what the loop reads while it is pending
    assert writer.wait() is None and not writer.written(path)
    assert writer.last_write_s == first_write_s
    out = capsys.readouterr().out
    assert "ckpt_0000002 not written" in out and "iteration 1 stays the resume point" in out
    assert writer.last_iteration == 1
    writer.submit(3, lambda: {"ok": True})
    assert writer.close()["iteration"] == 3 and writer.written(tmp_path / "checkpoints" /
                                                              "ckpt_0000003")
    # Any other failure to gather still fails the write, naming the checkpoint.
    other = CheckpointWriter(tmp_path / "c2", {}, write=lambda *a, **k: None)

    def broken():
        raise ValueError("boom")

    other.submit(4, broken)
    with pytest.raises(ckpt.CheckpointError, match="ckpt_0000004.*ValueError: boom"):
        other.close()


def _write(root, iteration):
    path = root / f"ckpt_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path
