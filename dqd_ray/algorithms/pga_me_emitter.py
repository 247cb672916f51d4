"""PGA-ME's policy-gradient emitter (see :mod:`dqd_ray.algorithms.pga_me`)."""

from __future__ import annotations

import numpy as np
from ribs.emitters import EmitterBase


class PolicyGradientEmitter(EmitterBase):
    """Asks for the greedy actor and ``batch_size - 1`` PG-varied random elites.

    The emitter only chooses the parents: after :meth:`ask`, :attr:`greedy_rows`
    and :attr:`vary_rows` say which rows of its batch the coordinator replaces
    with the learner's greedy actor and with PG variants of the parents. While
    the archive is empty it returns ``x0 + N(0, init_sigma^2)`` and asks for
    nothing.
    """

    def __init__(self, archive, x0, init_sigma: float, batch_size: int, seed: int | None = None):
        x0 = np.asarray(x0, archive.dtypes["solution"])
        EmitterBase.__init__(self, archive, solution_dim=len(x0), bounds=None,
                             lower_bounds=None, upper_bounds=None)
        self._rng = np.random.default_rng(seed)
        self._x0 = x0
        self._init_sigma = float(init_sigma)
        self._batch_size = int(batch_size)
        self.greedy_rows = np.zeros(0, np.int64)
        self.vary_rows = np.zeros(0, np.int64)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def ask(self) -> np.ndarray:
        n, d = self._batch_size, self.solution_dim
        if self.archive.empty:
            self.greedy_rows = np.zeros(0, np.int64)
            self.vary_rows = np.zeros(0, np.int64)
            noise = self._rng.normal(scale=self._init_sigma, size=(n, d))
            return (self._x0[None] + noise).astype(self.archive.dtypes["solution"])
        parents = self.archive.sample_elites(n - 1)["solution"]
        self.greedy_rows = np.array([0])
        self.vary_rows = np.arange(1, n)
        return np.concatenate([self._x0[None], parents]).astype(self.archive.dtypes["solution"])
