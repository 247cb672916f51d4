"""Linear-projection sphere and Rastrigin domains with exact gradients.

The DQD benchmark of Fontaine & Nikolaidis (2021): the objective is a shifted
sphere or Rastrigin function normalized to [0, 100] over [-5.12, 5.12]^n, and
the two measures are sums of the first and second halves of the solution,
each coordinate outside [-5.12, 5.12] replaced by 5.12 / x_i. Everything is
vectorized over a batch of solutions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

BOUND = 5.12
SHIFT = 0.4 * BOUND  # the optimum sits at x_i = 2.048


class LinearProjection:
    """Exact-gradient DQD domain.

    Args:
        dim: Solution dimension (even, >= 2).
        function: ``"sphere"`` or ``"rastrigin"``.

    Raises:
        ValueError: On an odd or too small dimension, or an unknown function.
    """

    def __init__(self, dim: int = 1000, function: Literal["sphere", "rastrigin"] = "sphere"):
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {dim}")
        if function not in ("sphere", "rastrigin"):
            raise ValueError(f"function must be 'sphere' or 'rastrigin', got {function!r}")
        self.dim = dim
        self.function = function
        self.best_raw = 0.0
        worst = -BOUND - SHIFT
        if function == "sphere":
            self.worst_raw = dim * worst**2
        else:
            self.worst_raw = dim * (10.0 + worst**2 - 10.0 * np.cos(2 * np.pi * worst))
        half = BOUND * dim / 2
        self.measure_ranges = ((-half, half), (-half, half))
        self.measure_dim = 2
        self.optimum = np.full(dim, SHIFT)

    def _raw(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = x - SHIFT
        if self.function == "sphere":
            return np.sum(d * d, axis=1), 2 * d
        value = np.sum(10.0 + d * d - 10.0 * np.cos(2 * np.pi * d), axis=1)
        return value, 2 * d + 20 * np.pi * np.sin(2 * np.pi * d)

    def evaluate(self, solutions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Objectives, measures and their jacobian.

        Args:
            solutions: Array of shape (batch, dim).

        Returns:
            ``(objectives (batch,), measures (batch, 2), jacobian (batch, 3, dim))``
            where jacobian row 0 is the objective gradient and rows 1..2 the
            measure gradients.

        Raises:
            ValueError: If the shape does not match ``(batch, dim)``.
        """
        x = np.asarray(solutions, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"solutions must have shape (batch, {self.dim}), got {x.shape}")
        raw, raw_grad = self._raw(x)
        scale = 100.0 / (self.best_raw - self.worst_raw)
        objectives = (raw - self.worst_raw) * scale
        obj_grad = raw_grad * scale

        outside = np.abs(x) > BOUND
        safe = np.where(outside, x, 1.0)
        clipped = np.where(outside, BOUND / safe, x)
        dclip = np.where(outside, -BOUND / (safe * safe), 1.0)
        h = self.dim // 2
        measures = np.stack([clipped[:, :h].sum(1), clipped[:, h:].sum(1)], axis=1)
        jac = np.zeros((x.shape[0], 3, self.dim))
        jac[:, 0] = obj_grad
        jac[:, 1, :h] = dclip[:, :h]
        jac[:, 2, h:] = dclip[:, h:]
        return objectives, measures, jac
