"""One module per algorithm family; the coordinator runs any of them.

Each module declares everything about its algorithm (settings, needs,
scheduler, evaluation counts, checkpoint classes, presets) and is registered
here; see :mod:`dqd_ray.algorithms.registry` for what a module declares and
how a new one plugs in. The declarations import no pyribs (the config imports
them all); a scheduler's pyribs parts are imported when it is built.
"""

from __future__ import annotations

import inspect

from dqd_ray.algorithms import cma_mae, cma_maega, cma_mega, map_elites, me_es, pga_me
from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, Needs
from dqd_ray.algorithms.registry import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    PAPER_PRESETS,
    PRESETS,
    Algorithm,
    configs,
    get,
    on_register,
    register,
    unregister,
)
from dqd_ray.state import statecodec


def _common_state() -> None:
    """What every algorithm's checkpoint may hold: the scheduler, its archives
    and rankers (declared when a checkpoint is first written or read)."""
    from ribs.archives import ArchiveStats, GridArchive
    from ribs.emitters import rankers

    from dqd_ray.algorithms.scheduler import MaskedScheduler

    statecodec.allow(MaskedScheduler, GridArchive, ArchiveStats,
                     *[c for _, c in inspect.getmembers(rankers, inspect.isclass)
                       if issubclass(c, rankers.RankerBase)])
    # The batch it asked for is spent once told (between iterations, when a
    # checkpoint is taken): not stored; the next ask makes a new one.
    statecodec.transient(MaskedScheduler, "_cur_solutions",
                         when=lambda s: s._last_called not in ("ask", "ask_dqd"))
    # Arrays that are None (or []) on a freshly built scheduler and filled once it
    # runs (a batch: in checkpoints of format version 3, or taken between ask and tell).
    statecodec.expect(MaskedScheduler,
                      _cur_solutions=statecodec.ArraySpec("f", (None, "_solution_dim")),
                      valid_mask=statecodec.ArraySpec("b", (None,)))
    # Checkpoints written before the scheduler moved to its own module name it so.
    statecodec.allow_old_name("dqd_ray.algorithms.base.MaskedScheduler", MaskedScheduler)


statecodec.allow_later(_common_state)

for _module in (cma_mega, cma_maega, pga_me, map_elites, me_es, cma_mae):
    register(_module)


def __getattr__(name: str):
    if name == "MaskedScheduler":  # imports pyribs: on first use only
        from dqd_ray.algorithms.scheduler import MaskedScheduler

        return MaskedScheduler
    raise AttributeError(f"module 'dqd_ray.algorithms' has no attribute {name!r}")


__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "PAPER_PRESETS", "PRESETS", "Algorithm",
           "AlgorithmSettings", "BuildContext", "MaskedScheduler", "Needs", "configs", "get",
           "on_register", "register", "unregister"]
