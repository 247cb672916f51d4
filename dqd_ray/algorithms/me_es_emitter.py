"""ME-ES's emitter and its helpers (see :mod:`dqd_ray.algorithms.me_es` for the
algorithm)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from ribs.emitters import EmitterBase

from dqd_ray.roles.es_gradients import centered_ranks

# ES runs' RunningStat: sums start at a tiny count with unit variance; std >= 0.1.
_STAT_EPS = 1e-2
_MIN_VAR = 1e-2
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def fold(theta: np.ndarray, mean: np.ndarray, std: np.ndarray, hidden: int) -> np.ndarray:
    """The plain genome computing ``theta`` on ``(obs - mean) / std``."""
    obs = len(mean)
    out = np.array(theta, np.float64)
    w = out[: obs * hidden].reshape(hidden, obs)
    w /= std[None, :]
    out[obs * hidden: obs * hidden + hidden] -= w @ mean
    return out


def unfold(genome: np.ndarray, mean: np.ndarray, std: np.ndarray, hidden: int) -> np.ndarray:
    """Inverse of :func:`fold` (up to rounding)."""
    obs = len(mean)
    out = np.array(genome, np.float64)
    w = out[: obs * hidden].reshape(hidden, obs)
    out[obs * hidden: obs * hidden + hidden] += w @ mean
    w *= std[None, :]
    return out


def novelty(queries: np.ndarray, archive: np.ndarray, k: int, drop_self: bool = False):
    """Mean squared distance of each query to its ``k`` nearest archive points.

    ``drop_self``: a query found in the archive (distance 0) skips itself, as a
    cell's own measures are in the novelty archive. An empty archive gives inf.
    """
    queries = np.atleast_2d(np.asarray(queries, np.float64))
    if len(archive) == 0:
        return np.full(len(queries), np.inf)
    d2 = ((queries[:, None, :] - archive[None, :, :]) ** 2).sum(axis=2)
    kk = min(k, d2.shape[1])
    near = np.sort(np.partition(d2, kk - 1, axis=1)[:, :kk], axis=1)
    if not drop_self:
        return near.mean(axis=1)
    out = np.empty(len(queries))
    for i, row in enumerate(near):
        row = row[1:] if row[0] == 0.0 else row
        out[i] = row.mean() if len(row) else 0.0
    return out


class MEESEmitter(EmitterBase):
    """The ME-ES individual, its novelty archive and its observation statistics.

    Unlike pyribs emitters it is not asked for a batch: :meth:`step` runs one
    ES generation with the evaluation function it is given and inserts the
    result into the archive itself.

    Args:
        archive: The ME archive.
        x0: Initial policy (in normalized-observation space; stats start at 0, 1).
        obs_dim: Observation size (the first layer's inputs).
        hidden: The first layer's outputs.
        cfg: :class:`~dqd_ray.config.MEESConfig`.
        seed: Seed of every draw (perturbations, cells, observation episodes).
    """

    def __init__(self, archive, x0, *, obs_dim: int, hidden: int, cfg, seed: int | None = None):
        x0 = np.asarray(x0, np.float64)
        EmitterBase.__init__(self, archive, solution_dim=len(x0), bounds=None,
                             lower_bounds=None, upper_bounds=None)
        if obs_dim * hidden + hidden > len(x0):
            raise ValueError(f"a genome of {len(x0)} values has no {obs_dim}x{hidden} first layer")
        self.rng = np.random.default_rng(seed)
        self.obs_dim, self.hidden = int(obs_dim), int(hidden)
        self.num_pairs, self.noise_std = int(cfg.num_pairs), float(cfg.noise_std)
        self.lr, self.l2_coeff = float(cfg.learning_rate), float(cfg.l2_coeff)
        self.consecutive_steps, self.k = int(cfg.consecutive_steps), int(cfg.novelty_k)
        self.mode = cfg.mode
        self.explore_strategy, self.exploit_strategy = cfg.explore_strategy, cfg.exploit_strategy
        self.action_noise = float(cfg.action_noise)
        self.obs_norm, self.obs_collect_prob = bool(cfg.obs_norm), float(cfg.obs_collect_prob)
        self.eval_episodes = int(cfg.eval_episodes)
        k = archive.measure_dim
        # The ES individual.
        self.theta = x0.copy()
        self.adam_m = np.zeros_like(x0)
        self.adam_v = np.zeros_like(x0)
        self.adam_t = 0
        self.explore = True  # flipped before the first run: the first run exploits
        self.steps_left = 0
        self.start_cell = -1
        self.previous_bc = np.zeros(k)
        self.initialized = False
        # Observation statistics (sum, sum of squares, count).
        self.obs_sum = np.zeros(obs_dim)
        self.obs_sumsq = np.full(obs_dim, _STAT_EPS)
        self.obs_count = _STAT_EPS
        # The novelty archive: measures of every policy evaluated (not the samples).
        self.ns_bcs = np.zeros((0, k))
        # Per filled cell, in discovery order.
        self.cells = np.zeros(0, np.int64)
        self.cell_bc = np.zeros((0, k))
        self.cell_novelty = np.zeros(0)
        self.cell_best_train = np.zeros(0)
        self.cell_obs_mean = np.zeros((0, obs_dim))
        self.cell_obs_std = np.zeros((0, obs_dim))

    @property
    def batch_size(self) -> int:
        return 0  # asks for no batch: see step()

    def ask(self) -> np.ndarray:
        return np.zeros((0, self.solution_dim), self.archive.dtypes["solution"])

    def tell(self, *args, **kwargs) -> None:
        return None

    # -- observation statistics ----------------------------------------------------

    def obs_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Current ``(mean, std)``; ``(0, 1)`` without observation normalization."""
        if not self.obs_norm:
            return np.zeros(self.obs_dim), np.ones(self.obs_dim)
        mean = self.obs_sum / self.obs_count
        std = np.sqrt(np.maximum(self.obs_sumsq / self.obs_count - mean ** 2, _MIN_VAR))
        return mean, std

    def _fold(self, thetas: np.ndarray, stats) -> np.ndarray:
        dtype = self.archive.dtypes["solution"]
        if not self.obs_norm:
            return np.asarray(thetas, dtype)
        return np.stack([fold(t, *stats, self.hidden) for t in thetas]).astype(dtype)

    # -- the generation --------------------------------------------------------------

    def step(self, evaluate: Callable[..., dict]) -> dict:
        """One ES generation (after the first evaluation of x0, on the first call).

        Args:
            evaluate: ``evaluate(genomes, **options) -> dict`` with ``fitness``,
                ``measures`` and ``valid``; options are ``action_noise`` and
                ``collect_obs`` (see :class:`~dqd_ray.roles.rollout.RolloutWorker`).

        Returns:
            Metrics of the generation.
        """
        if not self.initialized:
            stats = self.obs_stats()
            out = evaluate(self._fold(self.theta[None], stats))
            self._evaluated(out, stats, best_train=None, initial=True)
            self.initialized = not self.archive.empty
        if self.archive.empty:  # x0's episode was invalid: evaluated again next iteration
            return {"me_es_archive_empty": True}
        if self.steps_left == 0:
            self._new_run()
        self.steps_left -= 1
        stats = self.obs_stats()
        p, dim = self.num_pairs, self.solution_dim
        eps = self.rng.standard_normal((p, dim), dtype=np.float32)
        plus = self.theta[None] + self.noise_std * eps
        minus = self.theta[None] - self.noise_std * eps
        collect = np.zeros(2 * p, bool)
        if self.obs_norm:
            collect[p:] = self.rng.random(p) < self.obs_collect_prob
        out = evaluate(self._fold(np.concatenate([plus, minus]), stats),
                       action_noise=self.action_noise, collect_obs=collect)
        valid = np.asarray(out["valid"], bool)
        returns = np.where(valid, out["fitness"], -np.inf)
        if self.explore:
            score = novelty(np.nan_to_num(out["measures"]), self.ns_bcs, self.k)
            score = np.where(valid, score, -np.inf)
        else:
            score = returns
        ranks = centered_ranks(score)
        grad = (ranks[:p] - ranks[p:]) @ eps.astype(np.float64) / p
        update = self._adam(-grad + self.l2_coeff * self.theta)
        self.theta = self.theta + update
        best_train = float(returns.max()) if valid.any() else None
        # The new theta, without action noise, then the archive; then the statistics.
        evals = [self._fold(self.theta[None], stats)] * self.eval_episodes
        out_theta = evaluate(np.concatenate(evals))
        metrics = self._evaluated(out_theta, stats, best_train=best_train, initial=False)
        if self.obs_norm and "obs_sum" in out:
            self.obs_sum += out["obs_sum"][collect].sum(axis=0)
            self.obs_sumsq += out["obs_sumsq"][collect].sum(axis=0)
            self.obs_count += float(out["obs_count"][collect].sum())
        metrics.update({
            "me_es_explore": int(self.explore), "me_es_start_cell": int(self.start_cell),
            "me_es_sample_return_max": best_train,
            "me_es_sample_return_mean": float(out["fitness"][valid].mean()) if valid.any()
            else None,
            "me_es_grad_norm": float(np.linalg.norm(grad)),
            "me_es_update_ratio": float(np.linalg.norm(update) / max(np.linalg.norm(self.theta),
                                                                     1e-12)),
            "me_es_obs_count": float(self.obs_count),
            "me_es_novelty_archive": int(len(self.ns_bcs)),
        })
        return metrics

    def _adam(self, g: np.ndarray) -> np.ndarray:
        b1, b2 = _ADAM_BETAS
        self.adam_t += 1
        a = self.lr * np.sqrt(1 - b2 ** self.adam_t) / (1 - b1 ** self.adam_t)
        self.adam_m = b1 * self.adam_m + (1 - b1) * g
        self.adam_v = b2 * self.adam_v + (1 - b2) * g * g
        return -a * self.adam_m / (np.sqrt(self.adam_v) + _ADAM_EPS)

    def _evaluated(self, out: dict, stats, best_train, initial: bool) -> dict:
        """Inserts the evaluated theta; updates the cells' bookkeeping and novelty."""
        valid = np.asarray(out["valid"], bool)
        if not valid.all():
            return {"me_es_theta_valid": False}
        perf = float(np.mean(out["fitness"]))
        bc = np.asarray(out["measures"], np.float64).mean(axis=0)
        genome = self._fold(self.theta[None], stats)
        info = self.archive.add(solution=genome, objective=np.array([perf]),
                                measures=bc[None], seed=np.asarray(out["seed"])[:1])
        status = int(info["status"][0])
        cell = int(self.archive.index_of(bc[None])[0])
        if initial:
            best_train = perf
        else:
            # The run's previous theta: credit its cell with this population's best.
            prev_cell = int(self.archive.index_of(self.previous_bc[None])[0])
            at = np.flatnonzero(self.cells == prev_cell)
            if len(at) and np.array_equal(self.cell_bc[at[0]], self.previous_bc):
                self.cell_best_train[at[0]] = best_train
        at = np.flatnonzero(self.cells == cell)
        if status == 2 or (status == 1 and not len(at)):  # a new cell
            self.cells = np.append(self.cells, cell)
            self.cell_bc = np.vstack([self.cell_bc, bc[None]])
            self.cell_novelty = np.append(self.cell_novelty, 0.0)
            self.cell_best_train = np.append(self.cell_best_train, best_train)
            self.cell_obs_mean = np.vstack([self.cell_obs_mean, stats[0][None]])
            self.cell_obs_std = np.vstack([self.cell_obs_std, stats[1][None]])
        elif status == 1:  # a better policy for a known cell
            i = at[0]
            self.cell_bc[i] = bc
            self.cell_best_train[i] = best_train
            self.cell_obs_mean[i], self.cell_obs_std[i] = stats
        if initial:
            self.cell_novelty[np.flatnonzero(self.cells == cell)] = 1e6  # optimistic
        else:
            self.cell_novelty = novelty(self.cell_bc, self.ns_bcs, self.k, drop_self=True)
        self.ns_bcs = np.vstack([self.ns_bcs, bc[None]])
        self.previous_bc = bc
        return {"me_es_theta_fitness": perf, "me_es_theta_status": status,
                "me_es_theta_valid": True}

    # -- choosing where the next run starts ------------------------------------------

    def _new_run(self) -> None:
        if self.mode == "explore_exploit":
            self.explore = not self.explore
        else:
            self.explore = self.mode == "explore"
        i = self._sample_cell()
        cell = int(self.cells[i])
        genome = self.archive.retrieve_single(self.cell_bc[i])[1]["solution"]
        if self.obs_norm:
            self.theta = unfold(genome, self.cell_obs_mean[i], self.cell_obs_std[i], self.hidden)
        else:
            self.theta = np.asarray(genome, np.float64).copy()
        self.adam_m[:] = 0.0
        self.adam_v[:] = 0.0
        self.adam_t = 0
        self.start_cell = cell
        self.previous_bc = self.cell_bc[i].copy()
        self.steps_left = self.consecutive_steps

    def _sample_cell(self) -> int:
        n = len(self.cells)
        strategy = self.explore_strategy if self.explore else self.exploit_strategy
        rng = self.rng
        if strategy == "uniform":
            probs = np.full(n, 1.0 / n)
        elif strategy == "novelty_bias":
            scores = self.cell_novelty.copy()
            scores[np.argsort(scores)[:-5]] = 0.0
            total = scores.sum()
            if not np.isfinite(total) or total <= 0:
                probs = np.full(n, 1.0 / n)
            else:
                probs = 0.1 / n + 0.9 * scores / total
        elif strategy == "best_or_uniform":
            if rng.random() < 0.5:
                perf = np.array([self.archive.retrieve_single(b)[1]["objective"]
                                 for b in self.cell_bc])
                probs = np.zeros(n)
                probs[int(np.argmax(perf))] = 1.0
            else:
                probs = np.full(n, 1.0 / n)
        elif strategy == "best2inlast5_or_best":
            perfs = self.cell_best_train + (1.0 - self.cell_best_train.min())
            values = np.zeros(n)
            if rng.random() < 0.5 or n < 5:
                best = int(np.argmax(perfs))
                values[best] = perfs[best]
            else:
                last = np.arange(max(n // 2, n - 5), n)
                top = last[np.argsort(perfs[last])[::-1][:2]]
                values[top] = perfs[top]
            probs = values / values.sum()
        else:
            raise ValueError(f"unknown ME-ES cell strategy {strategy!r}")
        probs = probs / probs.sum()
        return int(rng.choice(n, p=probs))
