"""One module per algorithm family; the coordinator runs any of them.

Each module exposes ``needs(algo_cfg, measure_dim) -> Needs`` (what the
algorithm asks of the system) and ``build_scheduler(algo_cfg, ctx) ->
Scheduler`` (its pyribs archive, emitters and scheduler). Adding an algorithm
means adding a module here, its config class in :mod:`dqd_ray.config` and a
preset.
"""

from __future__ import annotations

from types import ModuleType

from dqd_ray.algorithms import cma_maega, cma_mega, map_elites, me_es, pga_me
from dqd_ray.algorithms.base import BuildContext, MaskedScheduler, Needs

def _allow_state_classes() -> None:
    """The classes a coordinator checkpoint may hold (see :mod:`dqd_ray.statecodec`)."""
    import inspect

    from ribs.archives import ArchiveStats, GridArchive
    from ribs.emitters import (GaussianEmitter, GradientArborescenceEmitter, IsoLineEmitter,
                               rankers)
    from ribs.emitters.opt import _cma_es, _gradient_ascent_opt, _adam_opt, _sep_cma_es

    from dqd_ray import statecodec

    statecodec.allow(MaskedScheduler, pga_me.PolicyGradientEmitter, me_es.MEESEmitter,
                     GridArchive, ArchiveStats, GaussianEmitter, GradientArborescenceEmitter,
                     IsoLineEmitter,
                     _cma_es.CMAEvolutionStrategy, _cma_es.DecompMatrix,
                     _sep_cma_es.SeparableCMAEvolutionStrategy, _sep_cma_es.DiagonalMatrix,
                     _gradient_ascent_opt.GradientAscentOpt, _adam_opt.AdamOpt)
    statecodec.allow(*[c for _, c in inspect.getmembers(rankers, inspect.isclass)
                       if issubclass(c, rankers.RankerBase)])
    # Arrays that are None (or []) on a freshly built object and filled once it runs.
    spec = statecodec.ArraySpec
    statecodec.expect(MaskedScheduler, _cur_solutions=spec("f", (None, "_solution_dim")),
                      valid_mask=spec("b", (None,)))
    statecodec.expect(GradientArborescenceEmitter, _jacobian_batch=spec(
        "f", (None, "_num_coefficients", "_solution_dim")))
    for es in (_cma_es.CMAEvolutionStrategy, _sep_cma_es.SeparableCMAEvolutionStrategy):
        statecodec.expect(es, _solutions=spec("f", (None, "solution_dim")),
                          mean=spec("f", ("solution_dim",)), pc=spec("f", ("solution_dim",)),
                          ps=spec("f", ("solution_dim",)))


_allow_state_classes()

ALGORITHMS: dict[str, ModuleType] = {
    "cma_mega": cma_mega,
    "cma_maega": cma_maega,
    "pga_me": pga_me,
    "map_elites": map_elites,
    "me_es": me_es,
}


def get(name: str) -> ModuleType:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "BuildContext", "MaskedScheduler", "Needs", "get"]
