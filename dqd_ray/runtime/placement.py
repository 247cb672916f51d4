"""Where the roles live: :class:`InProcess` (plain objects in this process) or
:class:`OnRay` (actors, with a deadline on every wait; see :mod:`dqd_ray.runtime.waits`)."""

from __future__ import annotations

import os
from typing import Any

from dqd_ray.roles.replay_actor import ReplayActorSampler, ReplaySink


def init_ray(address: str | None = None, num_cpus: int | None = None,
             runtime_env: dict | None = None) -> None:
    """Joins ``address`` (or ``RAY_ADDRESS``), else starts a local Ray; no-op
    when Ray is already initialized (inside a Tune trial, in tests)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env=runtime_env)


class _Done:
    """An in-process call's result, shaped like a future."""

    def __init__(self, value):
        self.value = value


class InProcess:
    """Roles as plain objects; calls run at once, in this process."""

    name = "inprocess"
    restarts = False  # nothing restarts a role that fails

    def resolve(self, cfg) -> tuple[int, float]:
        """(rollout workers, GPUs per learner); warns about the settings that
        have no effect in process."""
        from dqd_ray.runtime.resources import _warn, _warn_ray_only_fields, resolve_in_process

        n_workers, gpus = resolve_in_process(cfg)
        if n_workers > 1:
            _warn(f"resources.num_rollout_workers={n_workers}: in process the workers "
                  "evaluate one after another (same numbers as on Ray, no parallelism)")
        _warn_ray_only_fields(cfg.resources)
        return n_workers, gpus

    def connect(self, address: str | None = None, num_cpus: int | None = None) -> None:
        """Nothing to connect to in process."""

    def free_cpus(self) -> float | None:
        return None

    def restartable(self, options: dict, name: str | None = None) -> dict:
        return dict(options)

    def named(self, handle, name: str):
        return handle

    def wait_all(self, futures: list, timeout_s: float) -> int:
        """Waits for ``futures`` up to ``timeout_s``; returns how many did not finish."""
        self.get(futures)
        return 0

    def make(self, cls, options: dict, *args, **kw):
        return cls(*args, **kw)

    def call(self, handle, method: str, *args, group: str | None = None, **kw):
        return _Done(getattr(handle, method)(*args, **kw))

    def get(self, futures, timeout: float | None = None):
        if isinstance(futures, list):
            return [f.value for f in futures]
        return futures.value

    def wait_any(self, futures: list) -> tuple[Any, list]:
        return futures[0], futures[1:]

    def get_long(self, future, ping):
        """A long call (a whole iteration): in process it has already run."""
        return self.get(future)

    def put(self, value):
        return value

    def sink(self, replay):
        return replay.add

    def sampler(self, replay):
        return replay

    def kill(self, handle) -> None:
        close = getattr(handle, "close", None)
        if close is not None:
            close()


class OnRay:
    """Roles as Ray actors; calls return object refs.

    Every wait has a deadline (see :mod:`dqd_ray.runtime.waits`): a call that gets no
    answer within ``call_timeout_s`` from a live actor, or whose actor stays
    restarting longer than ``restart_timeout_s``, raises a
    :class:`~dqd_ray.runtime.waits.CallTimeoutError` naming the role (the ``role``
    option given to :meth:`make`), the method and the node.
    """

    name = "ray"
    restarts = True  # Ray restarts an actor whose node died (``restartable`` options)

    def __init__(self, call_timeout_s: float = 600.0, restart_timeout_s: float = 600.0):
        self.call_timeout_s, self.restart_timeout_s = call_timeout_s, restart_timeout_s
        self._names: dict[int, str] = {}
        self._roles: dict[str, str] = {}  # actor id (hex) -> "rollout worker 3"
        self._calls: dict = {}  # pending ref -> (method, actor id)

    def __getstate__(self):
        # Pickled into the coordinator: roles travel, pending calls do not.
        return {**self.__dict__, "_calls": {}, "_names": dict(self._names)}

    def resolve(self, cfg) -> tuple[int, float]:
        """(rollout workers, GPUs per learner), fitted to the cluster or trial."""
        from dqd_ray.runtime.resources import resolve_on_ray

        return resolve_on_ray(cfg)

    def connect(self, address: str | None = None, num_cpus: int | None = None) -> None:
        """Joins ``address`` or starts a local Ray (see :func:`init_ray`)."""
        init_ray(address, num_cpus)

    def free_cpus(self) -> float | None:
        import ray

        return ray.available_resources().get("CPU", 1.0)

    def restartable(self, options: dict, name: str | None = None) -> dict:
        """``options`` for an actor Ray restarts (and retries the calls of) after
        its node dies; ``name``: found by that name from other actors."""
        out = {**options, "max_restarts": -1, "max_task_retries": -1}
        if name is not None:
            out["name"] = name
        return out

    def wait_all(self, futures: list, timeout_s: float) -> int:
        """Waits for ``futures`` up to ``timeout_s`` (raising a failed call's
        error); returns how many did not finish."""
        import ray

        done, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        ray.get(done)
        self._forget(futures)
        return len(pending)

    def make(self, cls, options: dict, *args, **kw):
        import ray

        from dqd_ray.runtime.waits import actor_id_of

        options = dict(options)
        role = options.pop("role", cls.__name__)
        handle = ray.remote(**options)(cls).remote(*args, **kw)
        self._roles[actor_id_of(handle) or ""] = role
        return handle

    def call(self, handle, method: str, *args, group: str | None = None, **kw):
        from dqd_ray.runtime.waits import actor_id_of

        m = getattr(handle, method)
        if group is not None:
            m = m.options(concurrency_group=group)
        ref = m.remote(*args, **kw)
        if len(self._calls) > 4096:  # refs never waited for (fire and forget)
            self._calls.clear()
        self._calls[ref] = (method, actor_id_of(handle))
        return ref

    def _what(self, ref) -> tuple[str, str, str | None]:
        method, aid = self._calls.get(ref, ("?", None))
        return self._roles.get(aid or "", "an actor"), method, aid

    def _forget(self, refs) -> None:
        for r in refs:
            self._calls.pop(r, None)

    def get(self, futures, timeout: float | None = None):
        """Results; a :class:`~dqd_ray.runtime.waits.CallTimeoutError` (a ``TimeoutError``)
        names the role, call and node when a deadline passes first (``timeout``,
        default ``call_timeout_s``)."""
        from dqd_ray.runtime.waits import get_refs

        try:
            return get_refs(futures, timeout_s=timeout or self.call_timeout_s,
                            restart_timeout_s=self.restart_timeout_s, what=self._what)
        finally:
            self._forget(futures if isinstance(futures, list) else [futures])

    def wait_any(self, futures: list) -> tuple[Any, list]:
        """The first of ``futures`` to finish; a deadline error when none answers
        within ``call_timeout_s``."""
        from dqd_ray.runtime.waits import wait_refs

        done, rest = wait_refs(futures, 1, timeout_s=self.call_timeout_s,
                               restart_timeout_s=self.restart_timeout_s, what=self._what)
        return done[0], rest

    def get_long(self, future, ping):
        """A call that may legitimately run long (a whole iteration, made of
        many bounded calls): waited for as long as ``ping()`` (a call to the same
        actor in another concurrency group) keeps answering within
        ``call_timeout_s``, so a wedged actor is still found out."""
        import ray

        try:
            while True:
                done, _ = ray.wait([future], timeout=self.call_timeout_s, fetch_local=False)
                if done:
                    return ray.get(future)
                self.get(ping())
        finally:
            self._forget([future])

    def put(self, value):
        import ray

        return ray.put(value)

    # Workers and learners give the replay buffer a quarter of the deadline:
    # when it is the one stuck, its own deadline fires first and the message
    # names it, not the worker or learner waiting on it.
    def sink(self, replay):
        return ReplaySink(self._names.get(id(replay), replay),
                          timeout_s=self.call_timeout_s / 4,
                          restart_timeout_s=self.restart_timeout_s)

    def sampler(self, replay):
        return ReplayActorSampler(self._names.get(id(replay), replay),
                                  timeout_s=self.call_timeout_s / 4,
                                  restart_timeout_s=self.restart_timeout_s)

    def named(self, handle, name: str):
        """Remembers that ``handle`` was created under ``name`` (see :meth:`sink`)."""
        self._names[id(handle)] = name
        return handle

    def kill(self, handle) -> None:
        import ray

        try:
            ray.kill(handle)
        except Exception:  # noqa: BLE001 - best effort during shutdown
            pass


PLACEMENTS = {"inprocess": InProcess, "ray": OnRay}


def make_placement(name: str, resources) -> InProcess | OnRay:
    """The placement ``name`` with the deadlines of ``resources`` (Ray only)."""
    if name not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {name!r}")
    if name == "ray":
        return OnRay(call_timeout_s=resources.call_timeout_s,
                     restart_timeout_s=resources.wait_for_resources_s)
    return InProcess()
