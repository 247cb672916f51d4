"""The replay buffer as a restartable Ray actor, and the adapters the rollout
workers (:class:`ReplaySink`) and learners (:class:`ReplayActorSampler`) use to
reach it. Kept apart from :mod:`dqd_ray.system` so the processes that unpickle
these objects import only the replay buffer, not the whole system (torch,
pyribs)."""

from __future__ import annotations

import uuid
from pathlib import Path

from dqd_ray.replay import ReplayBuffer


# -- adapters over the replay actor ----------------------------------------------------


def _resolve(actor):
    """An actor handle from a handle or a per-run actor name."""
    if isinstance(actor, str):
        import ray

        return ray.get_actor(actor)
    return actor


class ReplaySink:
    """Sends transition chunks to the replay actor with bounded backpressure.

    ``replay`` is the actor's handle or its name. Restartable rollout workers
    get the name and look the actor up on first use: a handle among an actor's
    constructor arguments lives in the object store, and Ray cannot promise to
    restart an actor whose arguments may be gone (ray-project/ray#53727).
    """

    def __init__(self, replay, max_in_flight: int = 2):
        self._replay, self.max_in_flight = replay, max_in_flight
        self._pending: list = []

    @property
    def replay(self):
        self._replay = _resolve(self._replay)
        return self._replay

    def __call__(self, chunk: dict, key: tuple | None = None) -> None:
        import ray

        while len(self._pending) >= self.max_in_flight:
            done, self._pending = ray.wait(self._pending, num_returns=1)
            ray.get(done)
        self._pending.append(self.replay.add.remote(chunk, key))

    def drain(self) -> None:
        import ray

        if self._pending:
            ray.get(self._pending)
            self._pending = []

    def __getstate__(self):
        return {"_replay": self._replay, "max_in_flight": self.max_in_flight, "_pending": []}


class _Future:
    def __init__(self, ref):
        self.ref = ref

    def get(self):
        import ray

        return ray.get(self.ref)


class ReplayActorSampler:
    """A learner's sampler over the replay actor (its handle, or its name: the
    restartable learners get the name, like :class:`ReplaySink`)."""

    def __init__(self, replay):
        self._replay = replay

    @property
    def replay(self):
        self._replay = _resolve(self._replay)
        return self._replay

    def size(self) -> int:
        import ray

        return ray.get(self.replay.size.remote())

    def sample(self, batch_size: int, num_batches: int, seed: int | None = None) -> dict:
        import ray

        return ray.get(self.replay.sample.remote(batch_size, num_batches, seed))

    def sample_async(self, batch_size: int, num_batches: int, seed: int | None = None):
        return _Future(self.replay.sample.remote(batch_size, num_batches, seed))

    def sample_states(self, n: int, seed: int | None = None):
        import ray

        return ray.get(self.replay.sample_states.remote(n, seed))


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
        from dqd_ray import checkpoint as ckpt

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
