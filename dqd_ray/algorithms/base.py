"""What an algorithm declares, and the pieces every algorithm module shares."""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ribs.archives import GridArchive
from ribs.schedulers import Scheduler


class AlgorithmSettings(BaseModel):
    """Base of every algorithm's settings (``algorithm.*`` in a config): strict
    (unknown keys fail), with a ``name`` literal that selects the algorithm."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    x0_from_policy_init: bool = Field(
        True, description="Start from a Xavier-initialized policy (else zeros); paper: Xavier."
    )


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an algorithm asks of the system each iteration.

    Attributes:
        dqd: Whether it runs ``ask_dqd``/``tell_dqd`` with gradient rows.
        critic_objectives: Objectives (0 = fitness, j = measure j) with a TD3
            critic; empty means no learner is built at all.
        learner_rows: Jacobian rows taken from the critics.
        es_rows: Jacobian rows estimated by evolution strategies.
        greedy_insert: Evaluate the fitness agent's greedy actor with the
            batch and insert it into the archive outside the emitters.
        pg_variation: Some emitter asks for policy-gradient variation of
            elites (and the greedy actor) in its batch.
        critic_updates: Whether critics get a fixed number of updates per
            iteration in sync mode (``td3.train_steps_per_iteration``).
        es_steps: The emitters run their own generation (``step(evaluate)``,
            ME-ES): they evaluate, move and insert into the archive themselves,
            instead of the ask/tell batch.
    """

    dqd: bool = False
    critic_objectives: tuple[int, ...] = ()
    learner_rows: tuple[int, ...] = ()
    es_rows: tuple[int, ...] = ()
    greedy_insert: bool = False
    pg_variation: bool = False
    critic_updates: bool = False
    es_steps: bool = False


@dataclasses.dataclass
class BuildContext:
    """Everything a scheduler builder needs besides the algorithm's settings."""

    solution_dim: int
    x0: np.ndarray
    archive_dims: list[int]
    archive_ranges: list[tuple[float, float]]
    qd_offset: float
    seed_sequence: np.random.SeedSequence
    dtype: type = np.float32
    policy_first_layer: tuple[int, int] | None = None  # (obs_dim, hidden) of a policy genome

    def seeds(self, n: int) -> list[int]:
        return [int(s.generate_state(1)[0]) for s in self.seed_sequence.spawn(n)]

    def archive(self, seed: int, **kw) -> GridArchive:
        """A grid archive whose elites also keep their evaluation's env seed
        (``seed``), so an elite's episode can be replayed exactly."""
        return GridArchive(solution_dim=self.solution_dim, dims=list(self.archive_dims),
                           ranges=[tuple(r) for r in self.archive_ranges],
                           qd_score_offset=self.qd_offset, dtype=self.dtype, seed=seed,
                           extra_fields={"seed": ((), np.int64)}, **kw)


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
