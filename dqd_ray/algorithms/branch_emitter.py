"""The CMA-MEGA emitter: pyribs' gradient arborescence, with branches formed row
by row.

pyribs' :class:`~ribs.emitters.GradientArborescenceEmitter` forms the branches
``theta + sum_j c_ij grad_j`` as one broadcast product of shape
``(batch, 1 + k, D)`` and a sum over its middle axis: at the paper's settings
(98 branches, 5 gradients of a 21,256-parameter QD Ant policy) an 83 MB
temporary and most of the coordinator's own time. :class:`BranchEmitter` makes
each branch in a buffer of one row: the same products, added in the same order
(``c_i0 g_0 + c_i1 g_1 + ...``, then ``theta``), so the branches are bit for
bit pyribs' (a test compares them), several times faster.
"""

from __future__ import annotations

import numpy as np
from ribs.emitters import GradientArborescenceEmitter


def branches(theta: np.ndarray, jacobian: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``theta + sum_j coefficients[:, j] * jacobian[j]``, one row at a time.

    Args:
        theta: ``(D,)``.
        jacobian: ``(J, D)`` gradient rows.
        coefficients: ``(B, J)``.

    Returns:
        ``(B, D)``, equal to ``theta + np.sum(jacobian[None] * coefficients[:, :, None],
        axis=1)``.
    """
    n, k = coefficients.shape
    dtype = np.result_type(theta, jacobian, coefficients)
    out = np.empty((n, jacobian.shape[1]), dtype)
    tmp = np.empty(jacobian.shape[1], dtype)
    for i in range(n):
        row = out[i]
        np.multiply(coefficients[i, 0], jacobian[0], out=row)
        for j in range(1, k):
            np.multiply(coefficients[i, j], jacobian[j], out=tmp)
            row += tmp
        row += theta
    return out


class BranchEmitter(GradientArborescenceEmitter):
    """:class:`~ribs.emitters.GradientArborescenceEmitter` whose :meth:`ask` makes
    the same branches without the ``(batch, 1 + k, D)`` temporary."""

    #: :meth:`ask` returns a new array each call (the scheduler need not copy it).
    returns_fresh_batches = True

    def ask(self) -> np.ndarray:
        jac = self._jacobian_batch
        if jac is None or jac.shape[0] != 1:
            return super().ask()  # raises pyribs' own error when called out of order
        coefficients = np.asarray(self._opt.ask())
        return branches(np.asarray(self._grad_opt.theta), jac[0], coefficients)

    def tell_jacobian(self, jacobian: np.ndarray) -> None:
        """The part of :meth:`tell_dqd` that :meth:`ask` needs: the jacobian,
        checked and normalized (in place) as ``tell_dqd`` does. Lets the
        coordinator evaluate theta together with its branches (see
        :meth:`dqd_ray.algorithms.scheduler.MaskedScheduler.tell_jacobian`)."""
        jacobian = np.asarray(jacobian)
        shape = (self.archive.measure_dim + 1, self.archive.solution_dim)
        if jacobian.ndim != 3 or jacobian.shape[1:] != shape:
            raise ValueError(f"jacobian has shape {jacobian.shape}; expected (batch, *{shape})")
        if not np.all(np.isfinite(jacobian)):
            raise ValueError("All elements of jacobian must be finite (infinity and NaN "
                             "values are not supported).")
        if self._normalize_grads:
            norms = np.linalg.norm(jacobian, axis=2, keepdims=True) + self._epsilon
            jacobian /= norms
        self._jacobian_batch = jacobian
