"""Replay buffer: preallocated ring arrays with a fixed capacity.

A transition is (obs, action, reward vector [fitness, measure 1..k], next obs,
terminated). ``add`` copies what it is given, so the buffer never keeps a
reference to a caller's (or Ray object store's) array. Every method that
reads or writes the ring holds one lock, so producers and a learner's
background thread may share a buffer in one process.
"""

from __future__ import annotations

import threading

import numpy as np

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class ReplayBuffer:
    """Ring buffer of transitions.

    Args:
        obs_dim: Observation size.
        act_dim: Action size.
        reward_dim: 1 + number of measures.
        capacity: Maximum transitions kept; the oldest are overwritten.
        seed: Seed of the sampling RNG.
    """

    def __init__(self, obs_dim: int, act_dim: int, reward_dim: int,
                 capacity: int = 1_000_000, seed: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.act_dim, self.reward_dim = obs_dim, act_dim, reward_dim
        self.capacity = int(capacity)
        self._shapes = {
            "obs": (obs_dim,), "action": (act_dim,), "reward": (reward_dim,),
            "next_obs": (obs_dim,), "terminated": (),
        }
        self._data = {k: np.zeros((self.capacity, *s), np.float32) for k, s in self._shapes.items()}
        self._pos = 0
        self._size = 0
        self.total_added = 0
        self._staged: dict[tuple, dict] = {}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        # A checkpoint's capture (see capture_state); its own lock, so that
        # sampling goes on while the captured rows are copied.
        self._capture: dict | None = None
        self._capture_lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def size(self) -> int:
        return self._size

    @property
    def memory_bytes(self) -> int:
        return int(sum(a.nbytes for a in self._data.values()))

    def _validate(self, chunk: dict) -> int:
        if not isinstance(chunk, dict):
            raise TypeError(f"a chunk must be a dict with keys {FIELDS}, "
                            f"got {type(chunk).__name__}")
        missing = [k for k in FIELDS if k not in chunk]
        extra = [k for k in chunk if k not in FIELDS]
        if missing or extra:
            raise ValueError(f"chunk keys: missing {missing}, unexpected {extra}; need {FIELDS}")
        n = None
        for k in FIELDS:
            a = np.asarray(chunk[k])
            if a.dtype.kind not in "fb" or (a.dtype.kind == "b" and k != "terminated"):
                raise ValueError(f"chunk[{k!r}] has dtype {a.dtype}; expected a float array")
            if a.ndim == 0 or a.shape[1:] != self._shapes[k]:
                raise ValueError(
                    f"chunk[{k!r}] has shape {a.shape}; expected (n, *{self._shapes[k]})"
                )
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"chunk[{k!r}] has {a.shape[0]} rows, other fields have {n}")
        return int(n)

    def add(self, chunk: dict, key: tuple | None = None) -> int:
        """Copies a chunk of transitions in; returns how many were received.

        Args:
            chunk: Arrays ``obs, action, reward, next_obs, terminated``.
            key: When given, the chunk is staged and only appended by
                :meth:`commit`, in key order: producers that finish in any order
                then still give the same buffer (reproducible sync mode). A key
                sent again replaces its chunk: an evaluation retried after its
                worker died resends the same transitions, which are kept once.

        Raises:
            ValueError: On missing keys, wrong shapes or dtypes (nothing is added).
        """
        with self._lock:
            n = self._validate(chunk)
            if key is not None:
                self._staged[tuple(key)] = {k: np.array(chunk[k], np.float32) for k in FIELDS}
                return n
            return self._append(chunk, n)

    def add_keyed(self, items: list) -> int:
        """:meth:`add` of several keyed chunks, ``[(key, chunk), ...]``, in one call;
        returns how many transitions were received. Every chunk is checked
        before any is staged."""
        with self._lock:
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(it, (list, tuple)) and len(it) == 2 for it in items):
                raise TypeError("add_keyed takes a list of (key, chunk) pairs")
            sizes = [self._validate(chunk) for _, chunk in items]
            for (key, chunk), _ in zip(items, sizes):
                self._staged[tuple(key)] = {k: np.array(chunk[k], np.float32) for k in FIELDS}
            return int(sum(sizes))

    def commit(self) -> int:
        """Appends every staged chunk in key order; returns transitions appended."""
        with self._lock:
            total = 0
            for key in sorted(self._staged):
                chunk = self._staged[key]
                total += self._append(chunk, len(chunk["obs"]))
            self._staged.clear()
            return total

    def _append(self, chunk: dict, n: int) -> int:
        if n == 0:
            return 0
        self._finish_capture()  # the captured rows are copied before any is overwritten
        start = 0
        if n > self.capacity:  # only the newest `capacity` survive anyway
            start = n - self.capacity
        idx = (self._pos + np.arange(n - start)) % self.capacity
        for k in FIELDS:
            self._data[k][idx] = np.asarray(chunk[k])[start:]
        self._pos = int((self._pos + n - start) % self.capacity)
        self._size = min(self.capacity, self._size + n - start)
        self.total_added += n
        return n

    def _gen(self, seed: int | None) -> np.random.Generator:
        return self._rng if seed is None else np.random.default_rng(seed)

    def sample(self, batch_size: int, num_batches: int = 1,
               seed: int | None = None) -> dict[str, np.ndarray]:
        """Uniform samples: arrays of shape ``(num_batches, batch_size, ...)``.

        Args:
            batch_size: Transitions per batch.
            num_batches: Batches returned in this one call.
            seed: Sample with this seed instead of the buffer's own RNG (lets
                several consumers sample reproducibly in any call order).

        Raises:
            ValueError: If the buffer is empty.
        """
        with self._lock:
            if self._size == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            idx = self._gen(seed).integers(0, self._size, size=(num_batches, batch_size))
            return {k: v[idx] for k, v in self._data.items()}

    def sample_states(self, n: int, seed: int | None = None) -> np.ndarray:
        with self._lock:
            if self._size == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            return self._data["obs"][self._gen(seed).integers(0, self._size, size=n)]

    def stats(self) -> dict:
        return {"size": self._size, "capacity": self.capacity, "total_added": self.total_added,
                "memory_bytes": self.memory_bytes}

    def state_dict(self, include_data: bool = True) -> dict:
        with self._lock:
            state = {"pos": self._pos, "size": self._size, "total_added": self.total_added,
                     "rng": self._rng.bit_generator.state, "capacity": self.capacity,
                     "shapes": (self.obs_dim, self.act_dim, self.reward_dim)}
            if include_data:
                state["data"] = {k: v[: self._size].copy() for k, v in self._data.items()}
            return state

    def capture_state(self, include_data: bool = True) -> None:
        """Step one of a checkpoint, in microseconds: the counters and RNG now;
        the rows are copied by :meth:`captured_state` (from another thread,
        while sampling goes on) or, if an append comes first, by that append
        before it overwrites anything. Either way: :meth:`state_dict` as of now."""
        with self._lock:
            state = self.state_dict(include_data=False)
            with self._capture_lock:
                self._capture = {"state": state, "data": None if include_data else False}

    def _finish_capture(self) -> None:
        if self._capture is None:
            return
        with self._capture_lock:
            cap = self._capture
            if cap is not None and cap["data"] is None:
                size = cap["state"]["size"]
                cap["data"] = {k: v[:size].copy() for k, v in self._data.items()}

    def captured_state(self) -> dict:
        """Step two: the :meth:`state_dict` of :meth:`capture_state`'s moment."""
        self._finish_capture()
        with self._capture_lock:
            cap, self._capture = self._capture, None
        if cap is None:
            raise RuntimeError("captured_state() without capture_state() before it")
        if cap["data"] is False:
            return cap["state"]
        return {**cap["state"], "data": cap["data"]}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            with self._capture_lock:
                self._capture = None
            if tuple(state["shapes"]) != (self.obs_dim, self.act_dim, self.reward_dim):
                raise ValueError(f"replay state has shapes {state['shapes']}, buffer has "
                                 f"{(self.obs_dim, self.act_dim, self.reward_dim)}")
            self._rng.bit_generator.state = state["rng"]
            if "data" not in state:
                return
            size = int(state["size"])
            if size > self.capacity:
                raise ValueError(f"replay state holds {size} transitions, "
                                 f"capacity is {self.capacity}")
            pos = int(state["pos"])
            saved_capacity = int(state.get("capacity", self.capacity))
            if saved_capacity == self.capacity:
                # Same ring layout: sampling continues exactly as before.
                for k in FIELDS:
                    self._data[k][:size] = state["data"][k]
                self._pos = pos % self.capacity
            else:
                # Another capacity: lay the transitions out oldest first (a full
                # saved ring starts at its write position), and append after them.
                shift = pos if size == saved_capacity else 0
                for k in FIELDS:
                    self._data[k][:size] = np.roll(np.asarray(state["data"][k]), -shift, axis=0)
                self._pos = size % self.capacity
            self._size = size
            self.total_added = int(state["total_added"])
