"""Evolution-strategies gradient estimate (mirrored, rank-normalized).

For a solution theta, ``num_samples / 2`` Gaussian directions eps_i give the
mirrored points theta +- sigma * eps_i. Each requested objective's values over
all points are replaced by centered ranks in [-0.5, 0.5]; the gradient row is
sum_i (r_i+ - r_i-) eps_i / (num_samples * sigma).
"""

from __future__ import annotations

import threading

import numpy as np


def centered_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 mapped linearly to [-0.5, 0.5] (ties broken by order)."""
    n = values.shape[0]
    ranks = np.empty_like(values, dtype=np.float64)
    order = np.argsort(values, axis=0, kind="stable")
    np.put_along_axis(ranks, order, np.arange(n, dtype=np.float64)[:, None]
                      if values.ndim == 2 else np.arange(n, dtype=np.float64), axis=0)
    return ranks / max(n - 1, 1) - 0.5


class ESGradient:
    """Mirrored-sampling gradient estimator.

    Args:
        sigma: Perturbation std.
        num_samples: Evaluations per estimate (even).
        seed: Seed of the perturbation RNG.
    """

    def __init__(self, sigma: float = 0.02, num_samples: int = 100, seed: int | None = None):
        if num_samples < 2 or num_samples % 2:
            raise ValueError(f"num_samples must be even and >= 2, got {num_samples}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.num_samples = sigma, num_samples
        self.rng = np.random.default_rng(seed)
        self._ahead: tuple | None = None  # (thread, result box, dim, rng state before)

    def perturb(self, theta: np.ndarray,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(points (num_samples, D), eps (num_samples/2, D))``.

        The directions of the next call (same ``D``) are drawn ahead in a
        background thread, while the caller evaluates these points (numpy
        draws without the GIL): the same draws from the same generator, in the
        same order, so the same numbers as drawing on demand.

        Args:
            theta: ``(D,)``.
            out: Where to write the points (``(num_samples, D)``, any float
                dtype): each point is computed in ``float64`` and rounded once
                into it, as ``points.astype(out.dtype)`` would, without the
                ``float64`` copy. Default: a new array of theta's dtype.
        """
        half = self.num_samples // 2
        dim = theta.shape[0]
        eps = self._take(dim)
        if eps is None:
            eps = self.rng.standard_normal((half, dim))
        self._draw_ahead(dim)
        step = self.sigma * eps
        if out is not None:
            if out.shape != (2 * half, dim):
                raise ValueError(f"out has shape {out.shape}, expected {(2 * half, dim)}")
            points = out
        else:
            points = np.empty((2 * half, dim), np.result_type(theta, step))
        # theta + step, then theta - step, each computed once, in place.
        np.add(theta, step, out=points[:half])
        np.subtract(theta, step, out=points[half:])
        if out is not None:
            return out, eps
        return points.astype(np.asarray(theta).dtype, copy=False), eps

    def _draw_ahead(self, dim: int) -> None:
        box: dict = {}
        before = self.rng.bit_generator.state
        shape = (self.num_samples // 2, dim)

        def draw() -> None:
            box["eps"] = self.rng.standard_normal(shape)

        thread = threading.Thread(target=draw, name="es-directions", daemon=True)
        thread.start()
        self._ahead = (thread, box, dim, before)

    def _take(self, dim: int) -> np.ndarray | None:
        """The directions drawn ahead for ``dim`` (None: none; a drawing for
        another ``dim`` is undone, the generator set back)."""
        if self._ahead is None:
            return None
        thread, box, drawn_dim, before = self._ahead
        self._ahead = None
        thread.join()
        if drawn_dim != dim or "eps" not in box:
            self.rng.bit_generator.state = before
            return None
        return box["eps"]

    def checkpoint_rng(self) -> np.random.Generator:
        """The generator as if nothing had been drawn ahead (what a checkpoint
        stores: a restored estimator draws the same directions on demand)."""
        if self._ahead is None:
            return self.rng
        self._ahead[0].join()
        gen = np.random.Generator(type(self.rng.bit_generator)())
        gen.bit_generator.state = self._ahead[3]
        return gen

    def set_rng(self, rng: np.random.Generator) -> None:
        """Replaces the generator (a restored state), dropping what was drawn ahead."""
        if self._ahead is not None:
            self._ahead[0].join()
            self._ahead = None
        self.rng = rng

    def estimate(self, eps: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Gradient rows from the values at the perturbed points.

        Args:
            eps: ``(num_samples/2, D)`` from :meth:`perturb`.
            values: ``(num_samples, J)``: J objectives at the points (``+`` half first).

        Returns:
            ``(J, D)`` gradient estimates.
        """
        values = np.asarray(values, np.float64)
        if values.ndim == 1:
            values = values[:, None]
        half = eps.shape[0]
        if values.shape[0] != 2 * half:
            raise ValueError(f"expected {2 * half} values, got {values.shape[0]}")
        ranks = centered_ranks(values)
        diff = ranks[:half] - ranks[half:]  # (half, J)
        return diff.T @ eps / (self.num_samples * self.sigma)

    def gradient(self, theta: np.ndarray, fn) -> np.ndarray:
        """Convenience: ``fn(points) -> (num_samples, J)`` values, returns ``(J, D)``."""
        points, eps = self.perturb(np.asarray(theta))
        return self.estimate(eps, fn(points))
