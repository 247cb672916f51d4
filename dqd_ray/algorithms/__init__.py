"""One module per algorithm family; the coordinator runs any of them.

Each module declares everything about its algorithm (settings, needs,
scheduler, evaluation counts, checkpoint classes, presets) and is registered
here; see :mod:`dqd_ray.algorithms.registry` for what a module declares and
how a new one plugs in.
"""

from __future__ import annotations

import inspect

from ribs.archives import ArchiveStats, GridArchive
from ribs.emitters import rankers

from dqd_ray.algorithms import cma_maega, cma_mega, map_elites, me_es, pga_me
from dqd_ray.algorithms.base import AlgorithmSettings, BuildContext, MaskedScheduler, Needs
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

# What every algorithm's checkpoint may hold: the scheduler, its archives and rankers.
statecodec.allow(MaskedScheduler, GridArchive, ArchiveStats,
                 *[c for _, c in inspect.getmembers(rankers, inspect.isclass)
                   if issubclass(c, rankers.RankerBase)])
# Arrays that are None (or []) on a freshly built scheduler and filled once it runs.
statecodec.expect(MaskedScheduler,
                  _cur_solutions=statecodec.ArraySpec("f", (None, "_solution_dim")),
                  valid_mask=statecodec.ArraySpec("b", (None,)))

for _module in (cma_mega, cma_maega, pga_me, map_elites, me_es):
    register(_module)

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "PAPER_PRESETS", "PRESETS", "Algorithm",
           "AlgorithmSettings", "BuildContext", "MaskedScheduler", "Needs", "configs", "get",
           "on_register", "register", "unregister"]
