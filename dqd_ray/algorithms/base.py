"""What an algorithm declares, and the pieces every algorithm module shares.

Light on purpose (no pyribs import): the config imports every algorithm's
settings through it; pyribs is imported where a scheduler is built."""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


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

    def archive(self, seed: int, **kw):
        """A grid archive whose elites also keep their evaluation's env seed
        (``seed``), so an elite's episode can be replayed exactly."""
        from ribs.archives import GridArchive

        return GridArchive(solution_dim=self.solution_dim, dims=list(self.archive_dims),
                           ranges=[tuple(r) for r in self.archive_ranges],
                           qd_score_offset=self.qd_offset, dtype=self.dtype, seed=seed,
                           extra_fields={"seed": ((), np.int64)}, **kw)
