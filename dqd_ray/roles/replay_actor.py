"""The replay buffer as a restartable Ray actor, and the adapters the rollout
workers (:class:`ReplaySink`) and learners (:class:`ReplayActorSampler`) use to
reach it. Kept apart from the builder (:mod:`dqd_ray.runtime`) so the processes that unpickle
these objects import only the replay buffer, not the whole system (torch,
pyribs)."""

from __future__ import annotations

import uuid
from pathlib import Path

from dqd_ray.roles.replay import ReplayBuffer

# -- adapters over the replay actor ----------------------------------------------------


def _resolve(actor):
    """An actor handle from a handle or a per-run actor name."""
    if isinstance(actor, str):
        import ray

        return ray.get_actor(actor)
    return actor


class _ReplayClient:
    """A replay actor reached by handle or by name, with call deadlines (the
    placement gives it a quarter of ``resources.call_timeout_s``)."""

    SETTING = "a quarter of resources.call_timeout_s, for the replay buffer's short calls"

    def __init__(self, replay, timeout_s: float = 600.0, restart_timeout_s: float = 600.0):
        self._replay = replay
        self.timeout_s, self.restart_timeout_s = timeout_s, restart_timeout_s

    @property
    def replay(self):
        self._replay = _resolve(self._replay)
        return self._replay

    def _what(self, method: str):
        from dqd_ray.runtime.waits import actor_id_of

        aid = actor_id_of(self._replay)
        return lambda ref: ("the replay buffer", method, aid)

    def _get(self, refs, method: str):
        from dqd_ray.runtime.waits import get_refs

        return get_refs(refs, timeout_s=self.timeout_s, restart_timeout_s=self.restart_timeout_s,
                        what=self._what(method), setting=self.SETTING)

    def _wait_one(self, pending: list, method: str) -> list:
        import ray

        from dqd_ray.runtime.waits import wait_refs

        done, rest = wait_refs(pending, 1, timeout_s=self.timeout_s,
                               restart_timeout_s=self.restart_timeout_s, what=self._what(method),
                               setting=self.SETTING)
        ray.get(done)
        return rest


class ReplaySink(_ReplayClient):
    """Sends transition chunks to the replay actor with bounded backpressure.

    ``replay`` is the actor's handle or its name. Restartable rollout workers
    get the name and look the actor up on first use: a handle among an actor's
    constructor arguments lives in the object store, and Ray cannot promise to
    restart an actor whose arguments may be gone (ray-project/ray#53727).
    Every wait on the actor has the deadlines of :mod:`dqd_ray.runtime.waits`.

    Keyed chunks (one episode each, sync mode) are sent together, in one call
    once they hold ``batch_rows`` transitions and at :meth:`drain`: a short
    episode then costs no call of its own. The buffer stages them by key, so
    the result does not depend on how they were grouped.
    """

    def __init__(self, replay, max_in_flight: int = 2, timeout_s: float = 600.0,
                 restart_timeout_s: float = 600.0, batch_rows: int = 1000):
        super().__init__(replay, timeout_s, restart_timeout_s)
        self.max_in_flight, self.batch_rows = max_in_flight, int(batch_rows)
        self._pending: list = []
        self._keyed: list[tuple[tuple, dict]] = []
        self._keyed_rows = 0

    def _send(self, method: str, *args) -> None:
        while len(self._pending) >= self.max_in_flight:
            self._pending = self._wait_one(self._pending, method)
        self._pending.append(getattr(self.replay, method).remote(*args))

    def __call__(self, chunk: dict, key: tuple | None = None) -> None:
        if key is None:
            self._send("add", chunk, None)
            return
        self._keyed.append((tuple(key), chunk))
        self._keyed_rows += len(chunk["obs"])
        if self._keyed_rows >= self.batch_rows:
            self._send_keyed()

    def _send_keyed(self) -> None:
        if self._keyed:
            items, self._keyed, self._keyed_rows = self._keyed, [], 0
            self._send("add_keyed", items)

    def drain(self) -> None:
        self._send_keyed()
        if self._pending:
            self._get(self._pending, "add")
            self._pending = []

    def __getstate__(self):
        return {**self.__dict__, "_pending": [], "_keyed": [], "_keyed_rows": 0}


class _Future:
    def __init__(self, ref, client: _ReplayClient):
        self.ref, self.client = ref, client

    def get(self):
        return self.client._get(self.ref, "sample")


class ReplayActorSampler(_ReplayClient):
    """A learner's sampler over the replay actor (its handle, or its name: the
    restartable learners get the name, like :class:`ReplaySink`), with the
    deadlines of :mod:`dqd_ray.runtime.waits`."""

    def size(self) -> int:
        return self._get(self.replay.size.remote(), "size")

    def stats(self) -> dict:
        return self._get(self.replay.stats.remote(), "stats")

    def sample(self, batch_size: int, num_batches: int, seed: int | None = None) -> dict:
        return self._get(self.replay.sample.remote(batch_size, num_batches, seed), "sample")

    def sample_async(self, batch_size: int, num_batches: int, seed: int | None = None):
        return _Future(self.replay.sample.remote(batch_size, num_batches, seed), self)

    def sample_states(self, n: int, seed: int | None = None):
        return self._get(self.replay.sample_states.remote(n, seed), "sample_states")


class ReplayActor(ReplayBuffer):
    """The replay buffer of a run, restartable.

    When Ray restarts it (its node died), it reloads the replay data of the
    run's newest intact checkpoint (``checkpoints``: the run's checkpoints
    directory, if this node can read it: one machine, or shared storage) and
    the rollouts append to it from there. Otherwise it starts empty and the
    rollouts refill it; learners pause training until it holds
    ``td3.learning_starts`` transitions again, and keep their critics.
    """

    def __init__(self, *args, checkpoints: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.incarnation = uuid.uuid4().hex
        self.restored: dict | None = None
        if checkpoints and _reconstructed():
            self.restored = self._reload(Path(checkpoints))

    def _reload(self, root: Path) -> dict:
        from dqd_ray.state import checkpoint as ckpt

        info = {"checkpoint": None, "size": 0}
        try:
            found = ckpt.latest_valid(root) if root.exists() else None
            if found is not None and found[1].get("has_replay"):
                self.load_state_dict(ckpt.load_replay(found[0]))
                info = {"checkpoint": found[0].name, "size": self.size()}
        except Exception as err:  # noqa: BLE001 - never fail the restart: refill instead
            info["error"] = repr(err)
        print(f"replay buffer restarted: reloaded {info['size']} transitions from "
              f"{info['checkpoint'] or 'no checkpoint'} under {root}", flush=True)
        return info

    def stats(self) -> dict:
        return {**super().stats(), "incarnation": self.incarnation,
                "restored_size": None if self.restored is None else self.restored["size"]}


def _reconstructed() -> bool:
    """True inside a Ray actor that Ray restarted."""
    import ray

    if not ray.is_initialized():
        return False
    import warnings

    try:
        with warnings.catch_warnings():  # Ray 2.60 reads it through a deprecated helper
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not inside an actor
        return False
