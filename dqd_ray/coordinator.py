"""The MEGA coordinator: owns the archive and emitters, runs iterations.

One iteration: ask_dqd -> evaluate thetas -> gradients (TD3 jacobian, ES
estimate, exact, by configuration) -> tell_dqd -> ask -> evaluate branches ->
tell -> evaluate and insert the greedy TD3 actor -> metrics.

Evaluation and gradients go through two small interfaces, so the same
coordinator runs in process (tests, debugging) and against Ray actors:

- evaluator: ``evaluate(genomes, seeds) -> {"fitness", "measures", "length",
  "valid", "env_steps"}``;
- learner (TD3 gradient source): ``train(num_updates) -> dict``,
  ``jacobian(genomes) -> (G, E, D)``, ``greedy_genome() -> (D,)``.

Invalid solutions (non-finite actions, observations, objectives or measures)
never reach the archive: they are masked out of the insertion, ranked last for
the emitters and counted.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import cloudpickle
import numpy as np
from ribs.archives import GridArchive
from ribs.emitters import GradientArborescenceEmitter
from ribs.schedulers import Scheduler

from dqd_ray.es_gradients import ESGradient


class Evaluator(Protocol):
    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray) -> dict: ...


class Learner(Protocol):
    def train(self, num_updates: int) -> dict: ...
    def jacobian(self, genomes: np.ndarray) -> np.ndarray: ...
    def greedy_genome(self) -> np.ndarray: ...


class MaskedScheduler(Scheduler):
    """A pyribs Scheduler that inserts only the solutions marked valid.

    Invalid rows get ``status 0`` and the lowest value, so emitters rank them
    last; their (placeholder) objective and measures never enter an archive.
    """

    valid_mask: np.ndarray | None = None

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


class Coordinator:
    """Runs CMA-MEGA / CMA-MAEGA iterations.

    Args:
        solution_dim: Genome size.
        x0: Initial theta for every emitter.
        archive_dims: Cells per measure.
        archive_ranges: (low, high) per measure.
        qd_offset: QD-score offset of the domain.
        algorithm: :class:`dqd_ray.config.AlgorithmConfig`.
        evaluator: See module docstring.
        learner: TD3 gradient source, or None.
        learner_rows: Jacobian rows the learner provides (default: all if a
            learner is given).
        es: ES estimator for the rows the learner does not provide, or None.
        exact_jacobian: ``fn(genomes) -> (G, 1+k, D)`` for exact-gradient domains.
        td3_updates: Critic updates requested before each jacobian.
        seed: Root seed (emitters, archive, evaluation seeds).
        dtype: Solution dtype of the archive.
    """

    def __init__(self, *, solution_dim: int, x0: np.ndarray, archive_dims, archive_ranges,
                 qd_offset: float, algorithm, evaluator: Evaluator,
                 learner: Learner | None = None, learner_rows: list[int] | None = None,
                 es: ESGradient | None = None,
                 exact_jacobian: Callable[[np.ndarray], np.ndarray] | None = None,
                 td3_updates: int = 0, seed: int = 0, dtype=np.float32):
        self.algorithm = algorithm
        self.evaluator, self.learner, self.es = evaluator, learner, es
        self.exact_jacobian = exact_jacobian
        self.td3_updates = td3_updates
        self.measure_dim = len(archive_dims)
        self.num_rows = 1 + self.measure_dim
        if learner is not None:
            self.learner_rows = list(range(self.num_rows)) if learner_rows is None else learner_rows
        else:
            self.learner_rows = []
        self.es_rows = [r for r in range(self.num_rows) if r not in self.learner_rows]
        if exact_jacobian is None and self.es_rows and es is None:
            raise ValueError(f"jacobian rows {self.es_rows} have no gradient source: "
                             "give an ES estimator, a learner or an exact jacobian")
        ss = np.random.SeedSequence(seed)
        archive_seed, result_seed, eval_seed, *emitter_seeds = ss.spawn(3 + algorithm.num_emitters)
        self.archive_ranges = [tuple(r) for r in archive_ranges]
        common = dict(solution_dim=solution_dim, dims=list(archive_dims),
                      ranges=self.archive_ranges, qd_score_offset=qd_offset, dtype=dtype)
        result_archive = None
        if algorithm.name == "cma_maega":
            tmin = qd_offset if algorithm.threshold_min is None else algorithm.threshold_min
            archive = GridArchive(learning_rate=algorithm.archive_learning_rate,
                                  threshold_min=tmin, seed=archive_seed.generate_state(1)[0],
                                  **common)
            result_archive = GridArchive(seed=result_seed.generate_state(1)[0], **common)
        else:
            archive = GridArchive(seed=archive_seed.generate_state(1)[0], **common)
        emitters = [
            GradientArborescenceEmitter(
                archive, x0=np.asarray(x0), sigma0=algorithm.sigma0, lr=algorithm.lr,
                grad_opt="gradient_ascent", es="pycma_es", selection_rule=algorithm.selection_rule,
                restart_rule=algorithm.restart_rule, normalize_grad=algorithm.normalize_grad,
                batch_size=algorithm.batch_size, seed=int(s.generate_state(1)[0]),
            )
            for s in emitter_seeds
        ]
        self.scheduler = MaskedScheduler(archive, emitters, result_archive=result_archive)
        self.rng = np.random.default_rng(eval_seed)
        self.counters = {"iteration": 0, "evaluations": 0, "env_steps": 0, "invalid": 0,
                         "nonfinite_gradients": 0, "greedy_inserted": 0, "critic_updates": 0}

    # -- helpers ---------------------------------------------------------------

    @property
    def archive(self):
        return self.scheduler.archive

    @property
    def result_archive(self):
        return self.scheduler.result_archive

    def _evaluate(self, genomes: np.ndarray) -> dict:
        seeds = self.rng.integers(0, 2**31 - 1, size=len(genomes))
        out = self.evaluator.evaluate(genomes, seeds)
        valid = np.asarray(out["valid"], bool).copy()
        valid &= np.isfinite(out["fitness"]) & np.isfinite(out["measures"]).all(axis=1)
        out["valid"] = valid
        self.counters["evaluations"] += len(genomes)
        self.counters["env_steps"] += int(out.get("env_steps", 0))
        self.counters["invalid"] += int((~valid).sum())
        return out

    def _finite_data(self, out: dict) -> tuple[np.ndarray, np.ndarray]:
        valid = out["valid"]
        obj = np.where(valid, np.nan_to_num(out["fitness"]), 0.0)
        lows = np.array([r[0] for r in self.archive_ranges])
        meas = np.where(valid[:, None], np.nan_to_num(out["measures"]), lows)
        return obj, meas

    def _es_rows(self, thetas: np.ndarray) -> np.ndarray:
        """ES estimates of ``self.es_rows`` for each theta: ``(G, len(rows), D)``."""
        points, eps = [], []
        for theta in thetas:
            p, e = self.es.perturb(theta)
            points.append(p)
            eps.append(e)
        out = self._evaluate(np.concatenate(points))
        values = np.concatenate([out["fitness"][:, None], out["measures"]], axis=1)
        values = values[:, self.es_rows]
        values[~out["valid"]] = -np.inf  # invalid samples rank lowest
        n = self.es.num_samples
        return np.stack([self.es.estimate(eps[i], values[i * n:(i + 1) * n])
                         for i in range(len(thetas))])

    def jacobian(self, thetas: np.ndarray) -> np.ndarray:
        """The gradient rows an iteration tells the emitters, before normalization.

        Row 0 is fitness, row j the j-th measure, each uphill; rows come from
        the learner, the ES estimate (evaluating the perturbed points), or the
        exact jacobian, as configured. Non-finite rows are zeroed and counted.

        Returns:
            ``(len(thetas), 1 + k, D)`` float64.
        """
        if self.exact_jacobian is not None:
            jac = np.asarray(self.exact_jacobian(thetas), np.float64)
        else:
            jac = np.zeros((len(thetas), self.num_rows, thetas.shape[1]))
            if self.learner_rows:
                jac[:, self.learner_rows] = self.learner.jacobian(thetas)
            if self.es_rows:
                jac[:, self.es_rows] = self._es_rows(thetas)
        bad = ~np.isfinite(jac).all(axis=2)
        if bad.any():
            self.counters["nonfinite_gradients"] += int(bad.sum())
            jac[bad] = 0.0
        return jac

    # -- the iteration -----------------------------------------------------------

    def iteration(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        steps0, evals0 = self.counters["env_steps"], self.counters["evaluations"]
        timings = {"rollout_s": 0.0, "gradient_s": 0.0, "train_s": 0.0}
        train_info: dict = {}
        if self.learner is not None and self.td3_updates > 0:
            t = time.perf_counter()
            train_info = self.learner.train(self.td3_updates) or {}
            self.counters["critic_updates"] += int(train_info.get("updates", 0))
            timings["train_s"] += time.perf_counter() - t

        sched = self.scheduler
        thetas = sched.ask_dqd()
        t = time.perf_counter()
        out = self._evaluate(thetas)
        timings["rollout_s"] += time.perf_counter() - t
        t = time.perf_counter()
        jac = self.jacobian(thetas)
        timings["gradient_s"] += time.perf_counter() - t
        norms = np.linalg.norm(jac, axis=2)  # before the emitter normalizes in place
        obj, meas = self._finite_data(out)
        sched.valid_mask = out["valid"]
        sched.tell_dqd(obj, meas, jac)

        branches = sched.ask()
        t = time.perf_counter()
        out_b = self._evaluate(branches)
        timings["rollout_s"] += time.perf_counter() - t
        obj_b, meas_b = self._finite_data(out_b)
        sched.valid_mask = out_b["valid"]
        sched.tell(obj_b, meas_b)
        sched.valid_mask = None

        greedy = {}
        if self.learner is not None and self.algorithm.insert_greedy:
            t = time.perf_counter()
            genome = np.asarray(self.learner.greedy_genome())[None]
            out_g = self._evaluate(genome)
            timings["rollout_s"] += time.perf_counter() - t
            greedy["greedy_fitness"] = float(out_g["fitness"][0])
            if out_g["valid"][0]:
                data = dict(solution=genome, objective=out_g["fitness"],
                            measures=out_g["measures"])
                info = self.archive.add(**data)
                if self.scheduler._result_archive is not None:
                    self.result_archive.add(**data)
                inserted = bool(info["status"][0] > 0)
                # Not "greedy_inserted": that key is the cumulative counter.
                greedy["greedy_inserted_this_iteration"] = inserted
                self.counters["greedy_inserted"] += int(inserted)

        self.counters["iteration"] += 1
        metrics = self.metrics()
        metrics.update(greedy)
        metrics.update(timings)
        metrics["iteration_env_steps"] = self.counters["env_steps"] - steps0
        metrics["iteration_evaluations"] = self.counters["evaluations"] - evals0
        metrics["grad_norm_fitness"] = float(norms[:, 0].mean())
        metrics["grad_norm_measures"] = float(norms[:, 1:].mean())
        for key in ("critic_loss", "actor_loss"):
            if key in train_info:
                vals = np.asarray(train_info[key], np.float64)
                metrics[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                metrics[f"{key}_per_objective"] = vals.tolist()
        metrics["iteration_s"] = time.perf_counter() - t0
        return metrics

    def metrics(self) -> dict[str, Any]:
        stats = self.result_archive.stats
        return {
            **self.counters,
            "qd_score": float(stats.qd_score),
            "norm_qd_score": float(stats.norm_qd_score),
            "coverage": float(stats.coverage),
            "num_elites": int(stats.num_elites),
            "best_fitness": None if stats.obj_max is None else float(stats.obj_max),
            "mean_fitness": None if stats.obj_mean is None else float(stats.obj_mean),
            "restarts": int(sum(e.restarts for e in self.scheduler.emitters)),
        }

    # -- state -------------------------------------------------------------------

    def state_dict(self) -> bytes:
        """Archive(s), emitters (with pycma state), RNGs and counters."""
        return cloudpickle.dumps({
            "scheduler": self.scheduler,
            "rng": self.rng.bit_generator.state,
            "es_rng": None if self.es is None else self.es.rng.bit_generator.state,
            "counters": dict(self.counters),
        })

    def load_state_dict(self, blob: bytes) -> None:
        state = cloudpickle.loads(blob)
        self.scheduler = state["scheduler"]
        self.rng.bit_generator.state = state["rng"]
        if self.es is not None and state["es_rng"] is not None:
            self.es.rng.bit_generator.state = state["es_rng"]
        self.counters = dict(state["counters"])

    def archive_arrays(self) -> dict[str, np.ndarray]:
        """The result archive as plain arrays (for npz checkpoints and plots)."""
        data = self.result_archive.data()
        return {k: np.asarray(v) for k, v in data.items()}
