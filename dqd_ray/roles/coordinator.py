"""The coordinator: owns the archive and emitters and runs any algorithm's iteration.

An algorithm module (:mod:`dqd_ray.algorithms`) builds the pyribs scheduler
and declares what it needs (:class:`~dqd_ray.algorithms.Needs`). One
iteration, in sync learner mode:

1. stage this iteration's critic updates (batches from the experience up to
   the previous iteration) and start them: they train through both halves
   of the iteration, while the learners answer this iteration's gradient
   requests from the networks as they were when staged (see
   :meth:`~dqd_ray.roles.learner.Learner.stage`), so the numbers are those
   of the paper's order (updates during the branches, after the jacobian);
2. DQD algorithms: ``ask_dqd`` -> evaluate theta's ES samples (their
   transitions held until the iteration's end) -> gradient rows (critics,
   ES, or an exact jacobian) -> the emitters take the jacobian
   (``tell_jacobian``, the part of ``tell_dqd`` the branches need);
3. ``ask``; fill the rows emitters asked for (greedy actor, PG variants);
   add the greedy actor when the algorithm inserts it itself;
4. evaluate theta, the greedy actor and the branches in one batch; insert
   theta (``tell_thetas``: what ``tell_dqd`` inserts), then the greedy actor,
   ``tell`` the rest, wait for the updates (emitters without
   ``tell_jacobian`` evaluate theta with its samples and ``tell_dqd`` it);
5. robustness of the best elite when due; metrics.

Algorithms whose emitters run their own generation (ME-ES, ``Needs.es_steps``)
replace steps 2-4 by ``emitter.step(evaluate)``.

Evaluation and gradients go through two small interfaces (see
:mod:`dqd_ray.roles`), so the same coordinator runs in process and as a Ray
actor. Invalid solutions (non-finite actions, observations, objectives or
measures) never reach the archive: they are masked out of the insertion,
ranked last for the emitters and counted.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable

import numpy as np

from dqd_ray import algorithms
from dqd_ray.algorithms import BuildContext
from dqd_ray.metrics import COUNTERS, PhaseTimer
from dqd_ray.roles.es_gradients import ESGradient
from dqd_ray.state import statecodec


class Coordinator:
    """Runs iterations of the configured algorithm.

    Args:
        solution_dim: Genome size.
        x0: Initial solution (theta, or the centre of the first samples).
        archive_dims: Cells per measure.
        archive_ranges: (low, high) per measure.
        qd_offset: QD-score offset of the domain.
        algorithm: One of the algorithm configs of :mod:`dqd_ray.config`.
        evaluator: ``evaluate(genomes, seeds, record=True) -> dict``.
        learner: Gradient source over the TD3 critics, or None.
        learner_rows: Order of the rows ``learner.jacobian`` returns
            (default: the algorithm's learner rows).
        es: ES estimator for the ES rows, or None.
        exact_jacobian: ``fn(genomes) -> (G, 1+k, D)`` for exact-gradient domains.
        td3_updates: Critic updates per iteration (sync mode; 0 otherwise).
        seed: Root seed (emitters, archive, evaluation seeds).
        dtype: Solution dtype of the archive.
        max_fitness: Maximum fitness of the paper's normalized QD score.
        robustness_every: Iterations between robustness measurements (0: never).
        robustness_episodes: New-seed episodes per measurement.
        policy_first_layer: ``(obs_dim, hidden)`` of the policy genome's first
            layer (ME-ES folds observation statistics into it).
    """

    def __init__(self, *, solution_dim: int, x0: np.ndarray, archive_dims, archive_ranges,
                 qd_offset: float, algorithm, evaluator, learner=None,
                 learner_rows: list[int] | None = None, es: ESGradient | None = None,
                 exact_jacobian: Callable[[np.ndarray], np.ndarray] | None = None,
                 td3_updates: int = 0, seed: int = 0, dtype=np.float32,
                 max_fitness: float | None = None, robustness_every: int = 0,
                 robustness_episodes: int = 10,
                 policy_first_layer: tuple[int, int] | None = None):
        self.algorithm = algorithm
        self.module = algorithms.get(algorithm.name)
        self.measure_dim = len(archive_dims)
        self.num_rows = 1 + self.measure_dim
        self.needs = self.module.needs(algorithm, self.measure_dim)
        self.evaluator, self.learner, self.es = evaluator, learner, es
        self.exact_jacobian = exact_jacobian
        if self.needs.pg_variation and learner is None:
            raise ValueError(f"{algorithm.name} varies elites along a TD3 critic: give a learner")
        # Without a learner, the rows it would give come from ES (or the exact jacobian).
        self.greedy = self.needs.greedy_insert and learner is not None
        self.learner_rows = list(learner_rows if learner_rows is not None
                                 else self.needs.learner_rows) if learner is not None else []
        if self.needs.dqd and exact_jacobian is None:
            self.es_rows = [r for r in range(self.num_rows) if r not in self.learner_rows]
        else:
            self.es_rows = []
        if self.es_rows and es is None:
            raise ValueError(f"jacobian rows {self.es_rows} have no gradient source: "
                             "give an ES estimator, a learner or an exact jacobian")
        self.td3_updates = td3_updates if learner is not None else 0
        self.max_fitness, self.qd_offset = max_fitness, qd_offset
        self.robustness_every, self.robustness_episodes = robustness_every, robustness_episodes
        self.archive_ranges = [tuple(r) for r in archive_ranges]
        ss = np.random.SeedSequence(seed)
        sched_seed, eval_seed = ss.spawn(2)
        ctx = BuildContext(solution_dim=solution_dim, x0=np.asarray(x0),
                           archive_dims=list(archive_dims), archive_ranges=self.archive_ranges,
                           qd_offset=qd_offset, seed_sequence=sched_seed, dtype=dtype,
                           policy_first_layer=policy_first_layer)
        self.scheduler = self.module.build_scheduler(algorithm, ctx)
        self.rng = np.random.default_rng(eval_seed)
        self.counters = {k: 0 for k in COUNTERS}
        self.robustness: dict[str, Any] = {"key": None, "value": None}
        # A checkpoint's capture (see capture_state): its archive cells are
        # copied by whichever comes first, captured_state or the next evaluation.
        self._capture: dict | None = None
        self._capture_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------

    @property
    def archive(self):
        return self.scheduler.archive

    @property
    def result_archive(self):
        return self.scheduler.result_archive

    def _seeds(self, n: int) -> np.ndarray:
        return self.rng.integers(0, 2**31 - 1, size=n)

    def _evaluate(self, genomes: np.ndarray, record: bool = True, count: bool = True,
                  seeds: np.ndarray | None = None, **options) -> dict:
        if seeds is None:
            seeds = self._seeds(len(genomes))
        if record:
            out = self.evaluator.evaluate(genomes, seeds, **options)
        else:
            out = self.evaluator.evaluate(genomes, seeds, record=False, **options)
        self._finish_capture()  # before anything told from it changes an archive
        valid = np.asarray(out["valid"], bool).copy()
        valid &= np.isfinite(out["fitness"]) & np.isfinite(out["measures"]).all(axis=1)
        out["valid"] = valid
        out["seed"] = seeds  # archived with an elite: its episode can be replayed
        if count:
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

    def _es_points(self, thetas: np.ndarray,
                   lead: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """The ES points of every theta in one array, with ``lead`` empty rows
        first (room for the thetas: no copy to join them), and each theta's
        directions. The array has the dtype the evaluator runs genomes in
        (``genome_dtype``: float32 for the rollout workers, so no float64
        copy is made only to be cast; float64 by default)."""
        n = self.es.num_samples
        dtype = getattr(self.evaluator, "genome_dtype", None) or np.result_type(thetas, np.float64)
        batch = np.empty((lead + n * len(thetas), thetas.shape[1]), dtype)
        eps = []
        for i, theta in enumerate(thetas):
            _, e = self.es.perturb(theta, out=batch[lead + i * n:lead + (i + 1) * n])
            eps.append(e)
        return batch, eps

    def _es_estimates(self, out: dict, eps: list[np.ndarray]) -> np.ndarray:
        values = np.concatenate([out["fitness"][:, None], out["measures"]], axis=1)
        values = values[:, self.es_rows]
        values[~out["valid"]] = -np.inf  # invalid samples rank lowest
        n = self.es.num_samples
        return np.stack([self.es.estimate(e, values[i * n:(i + 1) * n])
                         for i, e in enumerate(eps)])

    def jacobian(self, thetas: np.ndarray, es_out: tuple | None = None) -> np.ndarray:
        """The gradient rows an iteration tells the emitters, before normalization.

        Row 0 is fitness, row j the j-th measure, each uphill; rows come from
        the learner, the ES estimate (evaluating the perturbed points unless
        ``es_out = (evaluation, eps)`` is given), or the exact jacobian.
        Non-finite rows are zeroed and counted.

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
                if es_out is None:
                    points, eps = self._es_points(thetas)
                    es_out = (self._evaluate(points), eps)
                jac[:, self.es_rows] = self._es_estimates(*es_out)
        bad = ~np.isfinite(jac).all(axis=2)
        if bad.any():
            self.counters["nonfinite_gradients"] += int(bad.sum())
            jac[bad] = 0.0
        return jac

    def _emitter_requests(self, sols: np.ndarray) -> np.ndarray:
        """Fills the rows emitters asked for: the greedy actor and PG variants."""
        offset = 0
        sols = np.array(sols)
        for emitter, n in zip(self.scheduler.emitters, self.scheduler._num_emitted):
            greedy = getattr(emitter, "greedy_rows", ())
            vary = getattr(emitter, "vary_rows", ())
            if len(greedy):
                sols[offset + np.asarray(greedy)] = self.learner.greedy_genome()
            if len(vary):
                rows = offset + np.asarray(vary)
                a = self.algorithm
                sols[rows] = self.learner.pg_variation(sols[rows], a.pg_steps, a.pg_lr,
                                                       a.pg_states)
            offset += n
        return sols

    # -- the iteration -----------------------------------------------------------

    def iteration(self) -> dict[str, Any]:
        """One iteration: the numbered steps of the module docstring."""
        timer = PhaseTimer()
        steps0, evals0 = self.counters["env_steps"], self.counters["evaluations"]
        metrics: dict[str, Any] = {}
        training = self._stage_training(timer)                     # 1
        late = None  # thetas left to the branches' half, with their seeds
        if self.needs.dqd:
            grad_metrics, late = self._gradient_step(timer)       # 2
            metrics.update(grad_metrics)
        if self.needs.es_steps:
            metrics.update(self._es_generation(timer))             # 2-4, ME-ES
        else:
            metrics.update(self._batch(timer, late))               # 3-4
        train_info = self._finish_training(training, timer)        # 4
        self.counters["iteration"] += 1
        self._after_iteration(timer)                               # 5
        return self._report(metrics, timer, train_info, steps0, evals0)

    def _stage_training(self, timer: PhaseTimer):
        """Step 1: stage this iteration's critic updates and start them (sync mode)."""
        if not (self.td3_updates > 0 and self.needs.critic_updates):
            return None
        with timer("phase_stage_s"):
            training = self.learner.stage_training(self.td3_updates)
            training.start()
            if hasattr(self.evaluator, "before_commit"):
                # The batches are drawn while theta and its samples are evaluated,
                # before their transitions enter the buffer.
                self.evaluator.before_commit = training.drawn
            else:
                training.drawn()
        return training

    def _gradient_step(self, timer: PhaseTimer) -> tuple[dict, tuple | None]:
        """Step 2: ``ask_dqd``, the ES samples, the gradient rows; then either
        ``tell_dqd`` after evaluating theta with its samples, or (every emitter
        taking its jacobian first) the jacobian told now and theta returned, to
        be evaluated with its branches (see :meth:`_batch`).

        The jacobian needs theta's genome, not its episode: evaluating theta
        with the branches leaves the first half its ES samples only (100
        evaluations at the paper's settings instead of 101: one round of
        episodes on 100 rollout CPUs instead of two; none at all without ES
        rows). The archive gets theta, the greedy actor and the branches in
        that order either way, and the first half's transitions are held
        until the iteration's end, so the jacobian, like the critic updates,
        sees the experience up to the previous iteration (as in the paper's
        code, which adds an iteration's experience at its end)."""
        sched = self.scheduler
        thetas = sched.ask_dqd()
        late = sched.tells_jacobian_first
        es = self.es_rows and self.exact_jacobian is None
        batch, eps, lead = thetas, None, 0 if late else len(thetas)
        if es:
            # theta first (unless it is evaluated later), then its samples, built
            # where the rollouts read them.
            batch, eps = self._es_points(thetas, lead=lead)
            batch[:lead] = thetas[:lead]
        out_all: dict = {}
        # Theta's episode seed is drawn with its samples' (as when it ran with
        # them): the same episodes whichever half runs it.
        seeds = self._seeds(len(thetas) + len(batch) - lead if es else len(thetas))
        theta_seeds, seeds = seeds[:len(thetas)], seeds[len(thetas) - lead:]
        if not late or es:
            hold = getattr(self.evaluator, "hold_commit", None) if late else None
            if hold is not None:
                hold()
            with timer("rollout_s", "phase_theta_es_s"):
                out_all = self._evaluate(batch, seeds=seeds)
        es_out = None
        if eps is not None:
            es_out = ({k: v[lead:] for k, v in out_all.items() if isinstance(v, np.ndarray)},
                      eps)
        with timer("gradient_s", "phase_jacobian_s"):
            jac = self.jacobian(thetas, es_out)
        norms = np.linalg.norm(jac, axis=2)  # before the emitter normalizes in place
        metrics = {"grad_norm_fitness": float(norms[:, 0].mean()),
                   "grad_norm_measures": float(norms[:, 1:].mean())}
        if late:
            sched.tell_jacobian(jac)
            return metrics, (thetas, theta_seeds)
        n = len(thetas)
        out = {k: v[:n] if isinstance(v, np.ndarray) else v for k, v in out_all.items()}
        obj, meas = self._finite_data(out)
        sched.valid_mask = out["valid"]
        sched.tell_dqd(obj, meas, jac, seed=out["seed"])
        return metrics, None

    def _es_generation(self, timer: PhaseTimer) -> dict:
        """Steps 2-4 of emitters that run their own generation (ME-ES)."""
        metrics: dict[str, Any] = {}
        seen: list[np.ndarray] = []

        def evaluate(genomes, **options):
            out = self._evaluate(genomes, **options)
            seen.append(out["fitness"][out["valid"]])
            return out

        with timer("rollout_s", "phase_batch_s"):
            for emitter in self.scheduler.emitters:
                metrics.update(emitter.step(evaluate))
            fits = np.concatenate(seen) if seen else np.zeros(0)
            if len(fits):
                metrics["mean_evaluation"] = float(fits.mean())
        return metrics

    def _batch(self, timer: PhaseTimer, late: tuple | None = None) -> dict:
        """Steps 3-4: ask, fill emitter requests, evaluate (with the thetas first,
        when :meth:`_gradient_step` left them to this half: ``late`` is
        ``(thetas, their seeds)``), insert the thetas, then tell."""
        sched, needs, metrics = self.scheduler, self.needs, {}
        thetas, theta_seeds = late if late is not None else (None, None)
        sols = sched.ask()
        with timer("gradient_s"):
            if needs.pg_variation:
                sols = self._emitter_requests(sols)
                sched.replace_batch(sols)  # the archive gets what was evaluated
            rows = [] if thetas is None else [thetas]
            greedy = np.asarray(self.learner.greedy_genome())[None] if self.greedy else None
            if greedy is not None:
                rows.append(greedy)
            batch = sols
            if rows:
                # In the evaluator's dtype when it has one (one copy, not two);
                # what enters the archive is the emitters' and learner's own.
                dtype = (getattr(self.evaluator, "genome_dtype", None) if thetas is not None
                         else None) or np.result_type(sols, *rows)
                batch = np.concatenate([*rows, sols], dtype=dtype)
                if batch.dtype == sched.archive.dtypes["solution"]:
                    # pyribs casts what it is told to the archive's dtype, for
                    # the archive and for each emitter's tell: told the cast
                    # rows themselves, it makes no 17 MB cast of its own.
                    sched.replace_batch(batch[sum(len(r) for r in rows):])
        seeds = None
        if thetas is not None:
            seeds = np.concatenate([theta_seeds, self._seeds(len(batch) - len(thetas))])
        with timer("rollout_s", "phase_batch_s"):
            out_b = self._evaluate(batch, seeds=seeds)
        if thetas is not None:
            t = len(thetas)
            out_t = {k: v[:t] if isinstance(v, np.ndarray) else v for k, v in out_b.items()}
            out_b = {k: v[t:] if isinstance(v, np.ndarray) else v for k, v in out_b.items()}
            obj_t, meas_t = self._finite_data(out_t)
            sched.valid_mask = out_t["valid"]
            sched.tell_thetas(obj_t, meas_t, seed=out_t["seed"])
            sched.valid_mask = None
        g = 1 if self.greedy else 0
        if g:
            metrics.update(self._insert_greedy(greedy, out_b))
        rest = {k: v[g:] if isinstance(v, np.ndarray) else v for k, v in out_b.items()}
        obj_b, meas_b = self._finite_data(rest)
        sched.valid_mask = rest["valid"]
        sched.tell(obj_b, meas_b, seed=rest["seed"])
        sched.valid_mask = None
        if out_b["valid"].any():
            metrics["mean_evaluation"] = float(np.mean(out_b["fitness"][out_b["valid"]]))
        if needs.pg_variation:
            for emitter in sched.emitters:
                if len(getattr(emitter, "greedy_rows", ())):
                    metrics["greedy_fitness"] = float(out_b["fitness"][emitter.greedy_rows[0]])
        return metrics

    def _finish_training(self, training, timer: PhaseTimer) -> dict:
        """End of step 4: wait for this iteration's critic updates."""
        if training is None:
            return {}
        with timer("train_s"):
            info = training.wait() or {}
        self.counters["critic_updates"] += int(info.get("updates", 0))
        if "train_s" in info:
            timer.seconds["critic_train_s"] = float(info["train_s"])
        return info

    def _after_iteration(self, timer: PhaseTimer) -> None:
        """Step 5: the learners' restart and snapshot checks; robustness when due."""
        if self.learner is not None and hasattr(self.learner, "after_iteration"):
            with timer("phase_learner_checks_s"):
                self.learner.after_iteration(self.counters["iteration"])
        if self.robustness_every and self.counters["iteration"] % self.robustness_every == 0:
            with timer("phase_robustness_s"):
                self._measure_robustness()

    def _report(self, metrics: dict, timer: PhaseTimer, train_info: dict, steps0: int,
                evals0: int) -> dict[str, Any]:
        """Step 5: the iteration's metrics (names declared in :mod:`dqd_ray.metrics`)."""
        out = {**self.metrics(), **metrics, **timer.seconds}
        out["iteration_env_steps"] = self.counters["env_steps"] - steps0
        out["iteration_evaluations"] = self.counters["evaluations"] - evals0
        for key in ("critic_loss", "actor_loss"):
            if key in train_info:
                vals = np.asarray(train_info[key], np.float64)
                out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                out[f"{key}_per_objective"] = vals.tolist()
        out["iteration_s"] = timer.elapsed()
        return out

    def _insert_greedy(self, genome: np.ndarray, out: dict) -> dict:
        """Inserts the greedy actor (row 0 of ``out``) before the emitters' batch."""
        info = {"greedy_fitness": float(out["fitness"][0])}
        if out["valid"][0]:
            data = dict(solution=genome, objective=out["fitness"][:1],
                        measures=out["measures"][:1], seed=out["seed"][:1])
            status = self.archive.add(**data)["status"]
            if self.scheduler._result_archive is not None:
                self.result_archive.add(**data)
            inserted = bool(status[0] > 0)
            # Not "greedy_inserted": that key is the cumulative counter.
            info["greedy_inserted_this_iteration"] = inserted
            self.counters["greedy_inserted"] += int(inserted)
        return info

    def _measure_robustness(self) -> None:
        """The best elite re-evaluated with new seeds: mean minus archived fitness.

        As in the paper, the value is re-used while the best elite is unchanged.
        """
        archive = self.result_archive
        if archive.empty:
            return
        best = archive.best_elite
        sol = np.asarray(best["solution"])
        key = hashlib.sha256(sol.tobytes()).hexdigest() + f":{float(best['objective'])!r}"
        if key == self.robustness["key"]:
            return
        genomes = np.repeat(sol[None], self.robustness_episodes, axis=0)
        out = self._evaluate(genomes, record=False, count=False)
        self.counters["robustness_evaluations"] += len(genomes)
        fit = out["fitness"][out["valid"]]
        value = float(fit.mean() - float(best["objective"])) if len(fit) else None
        self.robustness = {"key": key, "value": value}

    def metrics(self) -> dict[str, Any]:
        archive = self.result_archive
        stats = archive.stats
        cells = int(np.prod(archive.dims))
        out = {
            **self.counters,
            "qd_score": float(stats.qd_score),
            "qd_score_per_cell": float(stats.norm_qd_score),
            "coverage": float(stats.coverage),
            "num_elites": int(stats.num_elites),
            "best_fitness": None if stats.obj_max is None else float(stats.obj_max),
            "mean_fitness": None if stats.obj_mean is None else float(stats.obj_mean),
            "worst_fitness": None if archive.empty else float(archive.data("objective").min()),
            "restarts": int(sum(getattr(e, "restarts", 0) for e in self.scheduler.emitters)),
        }
        if self.learner is not None:
            out["learner_restarts"] = int(getattr(self.learner, "restarts", 0))
        if self.max_fitness is not None:
            out["norm_qd_score"] = float(stats.qd_score) / (
                cells * (self.max_fitness - self.qd_offset))
        if self.robustness_every:
            out["robustness"] = self.robustness["value"]
        return out

    # -- state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Scheduler (archives, emitters, CMA-ES), RNGs and counters as JSON plus arrays.

        The archives are stored as their occupied cells only (see
        :mod:`dqd_ray.state.statecodec`); nothing in it is pickled.
        """
        tree, arrays = statecodec.encode(self._state_objects())
        return {"tree": tree, "arrays": arrays}

    def _state_objects(self) -> dict:
        return {
            "scheduler": self.scheduler,
            "rng": self.rng,
            "es_rng": None if self.es is None else self.es.checkpoint_rng(),
            "counters": dict(self.counters),
            "robustness": dict(self.robustness),
        }

    def capture_state(self) -> None:
        """Step one of a checkpoint, between two iterations, in milliseconds.

        Takes :meth:`state_dict` now except the archives' cells, which
        :meth:`captured_state` (called from the checkpoint writer, in its own
        concurrency group) copies while the next iteration's first evaluation
        runs; if that evaluation returns first, the iteration copies them
        before it tells anything. Either way the cells are those of the
        capture (checked: see :class:`~dqd_ray.state.statecodec.DeferredStores`).
        """
        with self._capture_lock:
            tree, arrays, pending = statecodec.encode_deferred(self._state_objects())
            self._capture = {"tree": tree, "arrays": arrays, "pending": pending,
                             "archive": None}

    def _finish_capture(self) -> None:
        if self._capture is None:
            return
        with self._capture_lock:
            cap = self._capture
            if cap is not None and cap["archive"] is None:
                cap["pending"].finish()
                cap["archive"] = self.archive_arrays()

    def captured_state(self) -> dict:
        """Step two: ``{"coordinator": state_dict(), "archive": archive_arrays()}``
        as they were at :meth:`capture_state`."""
        self._finish_capture()
        with self._capture_lock:
            cap, self._capture = self._capture, None
        if cap is None:
            raise RuntimeError("captured_state() without capture_state() before it")
        return {"coordinator": {"tree": cap["tree"], "arrays": cap["arrays"]},
                "archive": cap["archive"]}

    def load_state_dict(self, state: dict) -> None:
        with self._capture_lock:
            self._capture = None
        fresh = {"scheduler": self.scheduler, "rng": self.rng,
                 "es_rng": None if self.es is None else self.es.rng,
                 "counters": self.counters, "robustness": self.robustness}
        from dqd_ray.algorithms.scheduler import MaskedScheduler

        out = statecodec.restore(fresh, state["tree"], state["arrays"])
        if not isinstance(out.get("scheduler"), MaskedScheduler):
            raise statecodec.StateError("checkpoint holds no scheduler")
        self.scheduler = out["scheduler"]
        self.rng = out["rng"]
        if self.es is not None and out["es_rng"] is not None:
            self.es.set_rng(out["es_rng"])
        self.counters = {k: int(out["counters"].get(k, 0)) for k in COUNTERS}
        self.robustness = dict(out["robustness"])

    def heartbeat(self) -> bool:
        """Answers from its own concurrency group while an iteration runs: the
        driver's proof that this actor (and its node) still lives."""
        return True

    def snapshot_learners(self) -> None:
        """Keeps the learners' current state (just loaded from a checkpoint) to
        restore a learner that restarts later."""
        if getattr(self.learner, "snapshot_every", 0):
            self.learner.snapshot(self.counters["iteration"])

    def archive_arrays(self) -> dict[str, np.ndarray]:
        """The result archive as plain arrays (for npz checkpoints and plots)."""
        data = self.result_archive.data()
        return {k: np.asarray(v) for k, v in data.items()}
