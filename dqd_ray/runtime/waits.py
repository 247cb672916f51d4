"""Deadlines for every wait on a Ray actor.

Ray waits forever by design: a call to an actor on a wedged node (alive but
silent) never returns, and a restartable actor that no node can host retries
forever. Every wait of the system goes through :func:`wait_refs`, which gives
up with a :class:`CallTimeoutError` naming the role, the call, the actor's
state and its node when

- no awaited call has answered within ``timeout_s`` (``resources.call_timeout_s``)
  while its actor is alive, or
- an awaited actor has been restarting (or waiting to be placed) for longer
  than ``restart_timeout_s`` (``resources.wait_for_resources_s``).

A restarting actor is given its restart bound even past ``timeout_s``: Ray
retries the call once the actor is back. Kept free of torch and pyribs: the
rollout workers import it through :mod:`dqd_ray.roles.replay_actor`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Actor states in which Ray is still trying to (re)start the actor.
STARTING = frozenset({"RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY"})


class CallTimeoutError(TimeoutError):
    """A role did not answer a call in time; the message names role, call and node."""


def actor_info(actor_id: str | None) -> dict:
    """State, node address, node id and pid of an actor (``{}`` if unknown)."""
    if not actor_id:
        return {}
    try:
        from ray._private import state

        info = state.actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - a diagnosis only: never mask the timeout itself
        return {}
    if not info:
        return {}
    addr = info.get("Address", {})
    return {"state": info.get("State"), "node_ip": addr.get("IPAddress") or "?",
            "node_id": (addr.get("NodeID") or "?")[:12], "pid": info.get("Pid"),
            "restarts": info.get("NumRestarts")}


def actor_id_of(handle) -> str | None:
    """The hex id of an actor handle (None for anything else)."""
    aid = getattr(handle, "_actor_id", None)
    try:
        return aid.hex() if aid is not None else None
    except Exception:  # noqa: BLE001
        return None


def describe(role: str, method: str, info: dict) -> str:
    if not info:
        where = "node unknown"
    elif info.get("node_ip", "?") == "?":  # restarting: no node yet
        where = (f"actor state {info.get('state')}, no node yet (last on node id "
                 f"{info.get('node_id')})")
    else:
        where = (f"actor state {info.get('state')}, node {info.get('node_ip')} "
                 f"(id {info.get('node_id')}), pid {info.get('pid')}")
    return f"{role} ({where}) did not answer {method}()"


# What a pending ref is: (role, method, actor id hex or None).
Describer = Callable[[Any], tuple[str, str, str | None]]


def wait_refs(refs: list, num_returns: int, *, timeout_s: float, restart_timeout_s: float,
              what: Describer, poll_s: float = 5.0,
              setting: str = "resources.call_timeout_s") -> tuple[list, list]:
    """``ray.wait`` for ``num_returns`` of ``refs``, with deadlines (see the module).

    Returns:
        ``(ready, pending)`` as ``ray.wait`` does.

    Raises:
        CallTimeoutError: Naming the first pending call that broke a deadline.
    """
    import ray

    t0 = time.monotonic()
    starting_since: dict[str, float] = {}
    pending = list(refs)
    ready: list = []
    while True:
        elapsed = time.monotonic() - t0
        step = max(0.01, min(poll_s, timeout_s - elapsed if elapsed < timeout_s else poll_s))
        got, pending = ray.wait(pending, num_returns=min(num_returns - len(ready), len(pending)),
                                timeout=step, fetch_local=False)
        ready += got
        if len(ready) >= num_returns or not pending:
            return ready, pending
        now = time.monotonic()
        silent: tuple | None = None
        starting: list[tuple] = []
        seen: set = set()
        for ref in pending:
            role, method, aid = what(ref)
            if aid in seen:
                continue
            seen.add(aid)
            info = actor_info(aid)
            if info.get("state") in STARTING:
                first = starting_since.setdefault(aid, now)
                if now - first > restart_timeout_s:
                    raise CallTimeoutError(
                        f"{describe(role, method, info)}: it has been restarting or waiting "
                        f"for a node for {now - first:.0f} s, longer than "
                        f"resources.wait_for_resources_s={restart_timeout_s:g}; no node "
                        "can host it (add nodes or lower its resources)")
                starting.append((role, method, info))
            else:
                starting_since.pop(aid, None)
                if silent is None:
                    silent = (role, method, info)
        if now - t0 >= timeout_s and silent is not None:
            role, method, info = silent
            raise CallTimeoutError(
                f"{describe(role, method, info)} within {timeout_s:g} s ({setting}): its "
                "node is stuck or the call is far slower than expected (raise "
                "resources.call_timeout_s if so)")


def get_refs(refs, *, timeout_s: float, restart_timeout_s: float, what: Describer,
             setting: str = "resources.call_timeout_s"):
    """``ray.get`` of one ref or a list, with the deadlines of :func:`wait_refs`."""
    import ray

    single = not isinstance(refs, list)
    items = [refs] if single else list(refs)
    unique = list(dict.fromkeys(items))  # ray.wait refuses repeated refs
    if unique:
        wait_refs(unique, len(unique), timeout_s=timeout_s,
                  restart_timeout_s=restart_timeout_s, what=what, setting=setting)
    out = ray.get(items)
    return out[0] if single else out
