"""The ring replay buffer: shapes, wrap-around, copying, validation and state."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dqd_ray.roles.replay import FIELDS, ReplayBuffer

OBS, ACT, REW = 3, 2, 3


def chunk(start: int, n: int) -> dict:
    """Transitions whose values encode their insertion index ``start + i``."""
    i = np.arange(start, start + n, dtype=np.float32)
    return {
        "obs": np.repeat(i[:, None], OBS, axis=1),
        "action": np.repeat(-i[:, None], ACT, axis=1),
        "reward": np.repeat(i[:, None] * 10, REW, axis=1),
        "next_obs": np.repeat(i[:, None] + 0.5, OBS, axis=1),
        "terminated": (i % 2).astype(np.float32),
    }


def stored_ids(buf: ReplayBuffer) -> np.ndarray:
    return np.sort(buf._data["obs"][: len(buf), 0])


def test_add_and_sample_shapes():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0)
    assert len(buf) == 0
    assert buf.add(chunk(0, 30)) == 30
    assert len(buf) == buf.size() == 30
    batch = buf.sample(16, num_batches=4)
    assert set(batch) == set(FIELDS)
    assert batch["obs"].shape == (4, 16, OBS)
    assert batch["next_obs"].shape == (4, 16, OBS)
    assert batch["action"].shape == (4, 16, ACT)
    assert batch["reward"].shape == (4, 16, REW)
    assert batch["terminated"].shape == (4, 16)
    assert all(v.dtype == np.float32 for v in batch.values())
    # Rows stay transitions: every field of a sampled row belongs to one index.
    ids = batch["obs"][..., 0]
    assert np.all((ids >= 0) & (ids < 30))
    np.testing.assert_array_equal(batch["action"][..., 0], -ids)
    np.testing.assert_array_equal(batch["reward"][..., 2], 10 * ids)
    np.testing.assert_array_equal(batch["next_obs"][..., 1], ids + 0.5)
    np.testing.assert_array_equal(batch["terminated"], ids % 2)
    states = buf.sample_states(9)
    assert states.shape == (9, OBS)
    assert np.all(states[:, 0] < 30)


def test_sample_covers_buffer_uniformly():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=1)
    buf.add(chunk(0, 10))
    ids = buf.sample(1000, 5)["obs"][..., 0].ravel()
    counts = np.bincount(ids.astype(int), minlength=10)
    assert counts.min() > 350 and counts.max() < 650  # 500 expected each


def test_wrap_around_keeps_newest():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    buf.add(chunk(0, 7))
    buf.add(chunk(7, 7))  # 14 total: 4..13 survive
    assert len(buf) == 10
    assert buf.total_added == 14
    np.testing.assert_array_equal(stored_ids(buf), np.arange(4, 14))
    # Exact ring positions: 10..13 overwrote slots 0..3.
    np.testing.assert_array_equal(buf._data["obs"][:, 0],
                                  [10, 11, 12, 13, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(buf._data["reward"][:, 0],
                                  10 * np.array([10, 11, 12, 13, 4, 5, 6, 7, 8, 9]))
    sampled = buf.sample(500)["obs"][..., 0]
    assert sampled.min() >= 4 and sampled.max() <= 13
    assert set(np.unique(sampled)) == set(range(4, 14))


def test_single_chunk_larger_than_capacity():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=8, seed=0)
    buf.add(chunk(0, 3))
    assert buf.add(chunk(3, 25)) == 25  # 28 total: 20..27 survive
    assert len(buf) == 8 and buf.total_added == 28
    np.testing.assert_array_equal(stored_ids(buf), np.arange(20, 28))
    np.testing.assert_array_equal(buf._data["next_obs"][:, 0] - 0.5, buf._data["obs"][:, 0])
    # The next add continues right after the newest transition.
    buf.add(chunk(28, 2))
    np.testing.assert_array_equal(stored_ids(buf), np.arange(22, 30))


def test_many_small_adds_wrap_exactly():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=7, seed=0)
    n = 0
    for size in [1, 3, 5, 2, 6, 4]:
        buf.add(chunk(n, size))
        n += size
        np.testing.assert_array_equal(stored_ids(buf), np.arange(max(0, n - 7), n))


def test_add_copies():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    c = chunk(0, 5)
    buf.add(c)
    for v in c.values():
        v[...] = 999.0
    assert not np.any(buf._data["obs"][:5] == 999.0)
    np.testing.assert_array_equal(buf._data["obs"][:5, 0], np.arange(5))
    batch = buf.sample(20)
    assert np.all(batch["reward"] < 999)
    # Sampled arrays are copies too.
    batch["obs"][...] = -7.0
    assert not np.any(buf._data["obs"][:5] == -7.0)


def test_bool_terminated_accepted():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    c = chunk(0, 4)
    c["terminated"] = np.array([True, False, True, False])
    buf.add(c)
    np.testing.assert_array_equal(buf._data["terminated"][:4], [1, 0, 1, 0])


def _bad_chunks():
    c = chunk(100, 4)
    yield "missing", {k: v for k, v in c.items() if k != "reward"}
    yield "extra", {**c, "info": np.zeros(4, np.float32)}
    yield "obs shape", {**c, "obs": np.zeros((4, OBS + 1), np.float32)}
    yield "action shape", {**c, "action": np.zeros((4,), np.float32)}
    yield "reward shape", {**c, "reward": np.zeros((4, REW - 1), np.float32)}
    yield "terminated shape", {**c, "terminated": np.zeros((4, 1), np.float32)}
    yield "rows", {**c, "next_obs": np.zeros((3, OBS), np.float32)}
    yield "int dtype", {**c, "obs": np.zeros((4, OBS), np.int64)}
    yield "object dtype", {**c, "reward": np.array([["a"] * REW] * 4)}
    yield "bool obs", {**c, "obs": np.zeros((4, OBS), bool)}
    yield "scalar", {**c, "terminated": np.float32(0)}


@pytest.mark.parametrize("name, bad", list(_bad_chunks()), ids=[n for n, _ in _bad_chunks()])
def test_invalid_chunk_raises_and_changes_nothing(name, bad):
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    buf.add(chunk(0, 6))
    before = {k: v.copy() for k, v in buf._data.items()}
    state = (len(buf), buf._pos, buf.total_added)
    with pytest.raises(ValueError):
        buf.add(bad)
    assert (len(buf), buf._pos, buf.total_added) == state
    for k in FIELDS:
        np.testing.assert_array_equal(buf._data[k], before[k])


def test_non_dict_chunk():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10)
    with pytest.raises(TypeError):
        buf.add([1, 2, 3])


def test_empty_chunk_is_a_no_op():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10)
    assert buf.add(chunk(0, 0)) == 0
    assert len(buf) == 0 and buf.total_added == 0


def test_empty_sample_raises():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    with pytest.raises(ValueError, match="empty"):
        buf.sample_states(4)


def test_bad_capacity():
    with pytest.raises(ValueError):
        ReplayBuffer(OBS, ACT, REW, capacity=0)


@pytest.mark.parametrize("total", [5, 23])  # before and after wrapping
def test_state_round_trip(total):
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=3)
    buf.add(chunk(0, total))
    buf.sample(4, 2)  # advance the RNG
    state = pickle.loads(pickle.dumps(buf.state_dict()))
    other = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=99)
    other.load_state_dict(state)
    assert len(other) == len(buf) and other.total_added == buf.total_added
    assert other.stats() == buf.stats()
    for _ in range(3):
        a, b = buf.sample(8, 3), other.sample(8, 3)
        for k in FIELDS:
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(buf.sample_states(5), other.sample_states(5))
    # Later adds land in the same slots.
    buf.add(chunk(total, 4))
    other.add(chunk(total, 4))
    for k in FIELDS:
        np.testing.assert_array_equal(buf._data[k], other._data[k])


def test_state_without_data_restores_only_rng():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=3)
    buf.add(chunk(0, 10))
    state = buf.state_dict(include_data=False)
    assert "data" not in state
    other = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=4)
    other.load_state_dict(state)
    assert len(other) == 0
    other.add(chunk(0, 10))
    np.testing.assert_array_equal(buf.sample(6)["obs"], other.sample(6)["obs"])


def test_load_state_checks_shapes_and_capacity():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    buf.add(chunk(0, 10))
    with pytest.raises(ValueError, match="shapes"):
        ReplayBuffer(OBS + 1, ACT, REW, capacity=10).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(OBS, ACT, REW, capacity=5).load_state_dict(buf.state_dict())


def test_memory_bytes_matches_preallocation():
    buf = ReplayBuffer(28, 8, 5, capacity=1000)
    expected = 1000 * (28 + 8 + 5 + 28 + 1) * 4
    assert buf.memory_bytes == expected
    assert buf.stats() == {"size": 0, "capacity": 1000, "total_added": 0,
                           "memory_bytes": expected}
    buf2 = ReplayBuffer(28, 8, 5, capacity=1000)
    buf2.add({"obs": np.zeros((10, 28), np.float32), "action": np.zeros((10, 8), np.float32),
              "reward": np.zeros((10, 5), np.float32), "next_obs": np.zeros((10, 28), np.float32),
              "terminated": np.zeros(10, np.float32)})
    assert buf2.memory_bytes == expected  # preallocated: adding does not grow it


# -- keyed staging (reproducible ordering in sync mode) ---------------------------------


def test_keyed_chunks_commit_in_key_order():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0)
    buf.add(chunk(0, 2))
    # Producers finish in any order; keys fix the order in the buffer.
    assert buf.add(chunk(20, 3), key=(1, 0)) == 3
    assert buf.add(chunk(10, 4), key=(0, 1)) == 4
    assert buf.add(chunk(5, 1), key=(0, 0)) == 1
    assert len(buf) == 2 and buf.total_added == 2  # staged, not yet visible
    assert buf.commit() == 8
    assert len(buf) == 10 and buf.total_added == 10
    np.testing.assert_array_equal(buf._data["obs"][:10, 0],
                                  [0, 1, 5, 10, 11, 12, 13, 20, 21, 22])
    assert buf.commit() == 0  # nothing left staged


def test_keyed_add_copies_and_validates():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0)
    c = chunk(0, 3)
    buf.add(c, key=(0,))
    c["obs"][...] = 999.0
    buf.add(chunk(0, 3), key=(0,))  # a retried evaluation resends: kept once
    bad = {**chunk(3, 2), "obs": np.zeros((2, OBS), np.int32)}
    with pytest.raises(ValueError):
        buf.add(bad, key=(1,))
    buf.commit()
    assert len(buf) == 3
    np.testing.assert_array_equal(buf._data["obs"][:3, 0], [0, 1, 2])


def test_keyed_chunks_sent_together_give_the_buffer_of_one_by_one():
    one, many = (ReplayBuffer(OBS, ACT, REW, capacity=100, seed=0) for _ in range(2))
    parts = [((2, 0), chunk(20, 3)), ((0, 1), chunk(10, 4)), ((0, 0), chunk(5, 1)),
             ((1, 0), chunk(30, 2))]
    for key, c in parts:
        one.add(c, key=key)
    assert many.add_keyed(parts[2:]) == 3 and many.add_keyed(parts[:2]) == 7
    assert one.commit() == many.commit() == 10
    for k in FIELDS:
        np.testing.assert_array_equal(one._data[k], many._data[k])
    # One bad chunk: nothing of the call is staged.
    bad = {**chunk(3, 2), "obs": np.zeros((2, OBS), np.int32)}
    with pytest.raises(ValueError):
        many.add_keyed([((5, 0), chunk(0, 2)), ((6, 0), bad)])
    with pytest.raises(TypeError, match="pairs"):
        many.add_keyed([chunk(0, 2)])
    assert many.commit() == 0


def test_seeded_sampling_is_independent_of_the_buffer_rng():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=50, seed=0)
    buf.add(chunk(0, 50))
    a = buf.sample(8, 2, seed=123)
    buf.sample(8)  # advances the buffer's own RNG only
    b = buf.sample(8, 2, seed=123)
    for k in FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(buf.sample_states(6, seed=5), buf.sample_states(6, seed=5))
    assert not np.array_equal(buf.sample(8, 2, seed=124)["obs"], a["obs"])


@pytest.mark.parametrize("total", [6, 10, 23])  # partial, exactly full, wrapped
@pytest.mark.parametrize("chunk_size", [4, 100])  # a wrapped ring's write position: 3 or 0
def test_load_into_a_larger_buffer_keeps_chronology(total, chunk_size):
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    for start in range(0, total, chunk_size):
        buf.add(chunk(start, min(chunk_size, total - start)))
    big = ReplayBuffer(OBS, ACT, REW, capacity=16, seed=0)
    big.load_state_dict(buf.state_dict())
    kept = min(total, 10)
    assert len(big) == kept
    np.testing.assert_array_equal(big._data["obs"][:kept, 0], np.arange(total - kept, total))
    # New transitions go after the newest; the oldest are overwritten first.
    big.add(chunk(total, 9))
    n = total + 9
    np.testing.assert_array_equal(stored_ids(big), np.arange(n - min(n - (total - kept), 16), n))
    assert np.all(big.sample(200)["obs"][..., 0] >= total - kept)  # no empty slots sampled


def test_capacity_one_keeps_the_newest():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=1, seed=0)
    buf.add(chunk(0, 3))
    buf.add(chunk(3, 1))
    assert len(buf) == 1 and stored_ids(buf).tolist() == [3]


def test_constructor_seed_drives_unseeded_sampling():
    bufs = [ReplayBuffer(OBS, ACT, REW, capacity=50, seed=s) for s in (7, 7, 8)]
    for b in bufs:
        b.add(chunk(0, 50))
    a, b, c = (buf.sample(16, 3)["obs"] for buf in bufs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    s1, s2 = bufs[0].sample_states(32), bufs[1].sample_states(32)
    np.testing.assert_array_equal(s1, s2)


def test_sample_states_reach_every_slot():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=8, seed=0)
    buf.add(chunk(0, 5))
    states = buf.sample_states(500, seed=1)
    assert states.shape == (500, OBS)
    assert sorted(np.unique(states[:, 0]).tolist()) == [0, 1, 2, 3, 4]


def test_reload_of_a_wrapped_ring_keeps_writing_over_the_oldest():
    buf = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    for start in range(0, 23, 5):
        buf.add(chunk(start, min(5, 23 - start)))  # ids 13..22 kept, next write: slot 3
    assert buf.state_dict()["pos"] == 3
    same = ReplayBuffer(OBS, ACT, REW, capacity=10, seed=0)
    same.load_state_dict(buf.state_dict())
    buf.add(chunk(23, 4))
    same.add(chunk(23, 4))
    np.testing.assert_array_equal(same._data["obs"], buf._data["obs"])
    assert stored_ids(same).tolist() == list(range(17, 27))
    np.testing.assert_array_equal(same.sample(8, 2, seed=3)["obs"], buf.sample(8, 2, seed=3)["obs"])
