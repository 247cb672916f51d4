"""The scheduler every algorithm builds: pyribs' Scheduler that inserts only
the solutions marked valid."""

from __future__ import annotations

import numpy as np
from ribs.schedulers import Scheduler

#: pyribs' ES engines whose numba helpers are compiled once per machine, not
#: once per process (see :func:`cache_pyribs_jit`).
JIT_MODULES = ("ribs.emitters.opt._cma_es", "ribs.emitters.opt._sep_cma_es",
               "ribs.emitters.opt._lm_ma_es")


def cache_pyribs_jit() -> list[str]:
    """Turns on numba's on-disk cache for pyribs' jitted ES helpers.

    pyribs compiles them without a cache, so every process that runs an
    emitter (each coordinator, each Tune trial, each resume) spent about 12 s
    of a 2-core machine compiling the same functions before its first
    ``tell``. With the cache the first process compiles and writes them
    (``__pycache__`` beside pyribs' sources, or numba's user cache directory
    when that is read-only); the others load them in milliseconds. Numba
    keys each entry on the source file, the argument types and the CPU, so a
    changed pyribs or another machine compiles afresh. Nothing is loaded from
    a run directory or a checkpoint.

    Returns:
        The functions whose cache is on (none where no cache directory is
        writable: they compile per process, as before).
    """
    import importlib

    from numba.core.dispatcher import Dispatcher

    on = []
    for name in JIT_MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != name:
                continue
            for attr, raw in vars(cls).items():
                fn = raw.__func__ if isinstance(raw, staticmethod) else raw
                if not isinstance(fn, Dispatcher):
                    continue
                if type(getattr(fn, "_cache", None)).__name__ == "NullCache":
                    try:
                        fn.enable_caching()
                    except RuntimeError:  # no writable cache directory
                        continue
                on.append(f"{name}.{cls.__name__}.{attr}")
    return on


def warm_pyribs_jit() -> list[str]:
    """Compiles every cached helper now (one ask and tell of each engine), so
    that a machine image ships them: ``docker/Dockerfile`` runs it. Returns
    what :func:`cache_pyribs_jit` returns."""
    import importlib

    on = cache_pyribs_jit()
    engines = {"ribs.emitters.opt._cma_es": "CMAEvolutionStrategy",
               "ribs.emitters.opt._sep_cma_es": "SeparableCMAEvolutionStrategy",
               "ribs.emitters.opt._lm_ma_es": "LMMAEvolutionStrategy"}
    for module, name in engines.items():
        es = getattr(importlib.import_module(module), name)(
            sigma0=0.3, solution_dim=10, batch_size=8, seed=0)
        es.reset(np.zeros(10))
        values = es.ask().sum(axis=1)
        order = np.argsort(-values)
        es.tell(order, values[order], num_parents=4)
        es.ask()
    return on


cache_pyribs_jit()


class MaskedScheduler(Scheduler):
    """A pyribs Scheduler that inserts only the solutions marked valid.

    Invalid rows get ``status 0`` and the lowest value, so emitters rank them
    last; their (placeholder) objective and measures never enter an archive.
    """

    valid_mask: np.ndarray | None = None
    #: The thetas told apart from their results (tell_jacobian), during one
    #: iteration only: never in a checkpoint.
    _thetas: tuple | None = None

    def _add_to_archives(self, data):
        mask = self.valid_mask
        if mask is None or mask.all():
            return super()._add_to_archives(data)
        n = len(mask)
        status = np.zeros(n, np.int32)
        value = np.full(n, -1e30)
        if mask.any():
            sub = {k: None if v is None else v[mask] for k, v in data.items()}
            info = self.archive.add(**sub)
            if self._result_archive is not None:
                self._result_archive.add(**sub)
            status[mask] = info["status"]
            value[mask] = info["value"]
            value[~mask] = min(float(np.min(info["value"])), 0.0) - 1e6
        return {"status": status, "value": value}

    def ask(self) -> np.ndarray:
        """pyribs' ``ask``; with one emitter whose batches are its own fresh
        arrays (``returns_fresh_batches``), that batch itself, not a copy made
        by joining it to nothing (17 MB a call at the paper's settings)."""
        if len(self._emitters) != 1 or \
                not getattr(self._emitters[0], "returns_fresh_batches", False):
            return super().ask()
        if self._last_called in ["ask", "ask_dqd"]:
            raise RuntimeError("ask cannot be called immediately after " + self._last_called)
        self._last_called = "ask"
        sols = self._emitters[0].ask()
        self._num_emitted[0] = len(sols)
        self._cur_solutions = sols
        return sols

    # -- theta evaluated with its branches ------------------------------------

    @property
    def tells_jacobian_first(self) -> bool:
        """Whether every emitter takes its jacobian apart from theta's results
        (:meth:`tell_jacobian`): then theta may be evaluated with the branches."""
        return all(hasattr(e, "tell_jacobian") for e in self._emitters)

    def tell_jacobian(self, jacobian) -> None:
        """The part of ``tell_dqd`` the branches need, before theta is evaluated:
        each emitter's jacobian (checked and normalized as ``tell_dqd`` does).
        Then :meth:`ask` may be called; :meth:`tell_thetas` inserts the thetas,
        once evaluated, and must come before :meth:`tell`. The archive sees
        what ``tell_dqd`` then ``tell`` would give it, in the same order."""
        if self._last_called != "ask_dqd":
            raise RuntimeError("tell_jacobian() was called without calling ask_dqd().")
        jacobian = np.asarray(jacobian)
        self._check_length("jacobian", jacobian)
        pos = 0
        for emitter, n in zip(self._emitters, self._num_emitted, strict=True):
            emitter.tell_jacobian(jacobian[pos:pos + n])
            pos += n
        self._thetas = (self._cur_solutions, list(self._num_emitted))
        self._last_called = "tell_dqd"

    def tell_thetas(self, objective, measures, **fields) -> None:
        """The thetas' insertion into the archives (what ``tell_dqd`` inserts),
        after :meth:`tell_jacobian` and :meth:`ask`, before :meth:`tell`."""
        thetas = self._thetas
        if thetas is None or self._last_called != "ask":
            raise RuntimeError("tell_thetas() belongs after tell_jacobian() and ask(), "
                               "before tell()")
        batch = (self._cur_solutions, self._num_emitted)
        self._cur_solutions, self._num_emitted = thetas[0], list(thetas[1])
        try:
            data = self._validate_tell_data({"objective": objective, "measures": measures,
                                             **fields})
            self._add_to_archives(data)
        finally:
            self._cur_solutions, self._num_emitted = batch
        del self._thetas  # back to the class's None: nothing of it is checkpointed

    def replace_batch(self, solutions: np.ndarray) -> None:
        """Makes ``solutions`` the batch the next :meth:`tell` inserts, in place of
        what :meth:`ask` returned: rows the coordinator filled (the greedy actor,
        PG variants of elites) go into the archive as evaluated, not their parents."""
        if self._last_called != "ask":
            raise RuntimeError("replace_batch() belongs between ask() and tell()")
        solutions = np.asarray(solutions, self.archive.dtypes["solution"])
        if solutions.shape != np.shape(self._cur_solutions):
            raise ValueError(f"replacement batch has shape {solutions.shape}, the asked "
                             f"batch {np.shape(self._cur_solutions)}")
        self._cur_solutions = solutions

    def tell(self, objective, measures, **fields):
        mask = self.valid_mask
        if mask is not None and not mask.any() and self.archive.empty:
            # Nothing to rank and nothing to restart from: an emitter's
            # no-improvement restart would sample an elite from the empty
            # archive (IndexError in pyribs). Skip the emitters' update; they
            # sample again from the same distribution next iteration.
            if self._last_called != "ask":
                raise RuntimeError("tell() was called without calling ask().")
            self._last_called = "tell"
            return
        super().tell(objective, measures, **fields)
