"""The learners as one gradient source, with their fault handling."""

from __future__ import annotations

import numpy as np

from dqd_ray.roles import StagedTraining
from dqd_ray.runtime.resources import _warn


class LearnerGroup:
    """The learners as one gradient source: rows reassembled in objective order.

    On Ray, learners are restartable actors. The coordinator's group checks
    each learner's incarnation around every request; a learner that Ray
    restarted (its node died) gets the critics of the group's latest snapshot
    (taken every ``snapshot_every`` iterations and after a checkpoint is
    loaded), restarts background training in async mode, and the request is
    repeated, so no gradient ever comes from untrained critics.

    Args:
        placement: The placement the learners live on.
        learners: Learner handles (or objects, in process).
        objectives: Objectives of each learner.
        async_train: Learners train in the background (restarted after a restore).
        snapshot_every: Iterations between snapshots (0: none).
        restart_timeout_s: How long a check waits for a restarting learner.
    """

    def __init__(self, placement, learners: list, objectives: list[list[int]], *,
                 async_train: bool = False, snapshot_every: int = 0,
                 restart_timeout_s: float | None = None):
        self.placement, self.learners = placement, list(learners)
        self.objectives = [list(o) for o in objectives]
        self.rows = [o for objs in self.objectives for o in objs]
        self.async_train, self.snapshot_every = async_train, snapshot_every
        self.restart_timeout_s = restart_timeout_s
        self._known: list[str] | None = None
        self._ticket = 0  # names each stage for its updates (see stage_training)
        self._snapshot: list | None = None
        self.snapshot_iteration: int | None = None
        self.restarts = 0
        # A fixed buffer batch and each learner's critic loss on it at the last
        # snapshot: a restore is checked (and reported) against it.
        self._probe: dict | None = None
        self._snapshot_probe: list[float] | None = None

    def _all(self, method: str, *args, group: str | None = "grad") -> list:
        p = self.placement
        return p.get([p.call(lr, method, *args, group=group) for lr in self.learners])

    # -- restarts ------------------------------------------------------------

    def check(self) -> bool:
        """Restores every learner restarted since the last check; True if any was.

        Raises:
            RuntimeError: A learner did not answer within ``restart_timeout_s``
                (restarting, with no node able to host it).
        """
        p = self.placement
        try:
            ids = p.get([p.call(lr, "incarnation_id", group="grad") for lr in self.learners],
                        timeout=self.restart_timeout_s)
        except TimeoutError as err:
            from dqd_ray.runtime.waits import CallTimeoutError

            raise CallTimeoutError(
                f"{err} (a learner restarting with no node to host it? "
                "resources.learner_resource, GPUs); add nodes and resume the run, or raise "
                "resources.wait_for_resources_s") from None
        if self._known is None:
            self._known = ids
            return False
        restarted = [i for i, (a, b) in enumerate(zip(self._known, ids)) if a != b]
        for i in restarted:
            lr = self.learners[i]
            if self._snapshot is not None:
                fresh = self._probe_loss(lr)
                sealed, updates = self._snapshot[i]
                p.get(p.call(lr, "load_sealed_snapshot", sealed, group="grad"))
                what = (f"restored the critics of iteration {self.snapshot_iteration} "
                        f"({updates} updates)")
                if fresh is not None and self._snapshot_probe is not None:
                    what += (f"; probe critic loss {self._snapshot_probe[i]:.6g} at the "
                             f"snapshot, {self._probe_loss(lr):.6g} restored, "
                             f"{fresh:.6g} before the restore")
            else:
                what = "no snapshot yet: it starts from scratch"
            if self.async_train:
                p.get(p.call(lr, "start_async", group="train"))
            self.restarts += 1
            _warn(f"learner {i} was restarted (its node died?); {what}")
        self._known = ids
        return bool(restarted)

    def _guarded(self, fn):
        for _ in range(3):
            self.check()
            out = fn()
            if not self.check():
                return out
        raise RuntimeError("learners restarted during three attempts of one gradient "
                           "request; is a learner node failing repeatedly?")

    def snapshot(self, iteration: int) -> None:
        """Keeps a copy of every learner's state, to restore a restarted learner."""
        self.check()
        if self._probe is None:
            p = self.placement
            self._probe = p.get(p.call(self.learners[0], "probe_batch", 256, 20220516,
                                       group="grad"))
        # Sealed (pickled by the learner): this process keeps bytes, not tensors.
        states = self._all("sealed_snapshot", self._probe)
        self._snapshot = [(sealed, updates) for sealed, updates, _ in states]
        self._snapshot_probe = ([loss for _, _, loss in states] if self._probe is not None
                                else None)
        self.snapshot_iteration = iteration

    def _probe_loss(self, learner) -> float | None:
        if self._probe is None:
            return None
        p = self.placement
        return p.get(p.call(learner, "probe_loss", self._probe, group="grad"))

    def after_iteration(self, iteration: int) -> None:
        """Called by the coordinator at the end of each iteration."""
        if self.snapshot_every and (iteration == 1 or iteration % self.snapshot_every == 0):
            self.snapshot(iteration)
        else:
            self.check()

    # -- the gradient source -------------------------------------------------------

    def _fitness_learner(self):
        for lr, objs in zip(self.learners, self.objectives):
            if 0 in objs:
                return lr
        raise RuntimeError("no learner owns the fitness agent")

    def train(self, num_updates: int) -> dict:
        return self._guarded(lambda: _merge_losses(self._all("train", num_updates, group=None),
                                                   self.objectives))

    def stage_training(self, num_updates: int) -> StagedTraining:
        """Sends every learner its stage and, at ``start()``, its updates,
        without waiting: on Ray the batches are drawn while the iteration's
        first half is evaluated. ``drawn()`` (the evaluator calls it before its
        next commit) waits for them: the batches hold the experience up to the
        previous iteration whatever the timing."""
        p = self.placement
        self.check()
        self._ticket += 1
        ticket = self._ticket
        staged = [p.call(lr, "stage", num_updates, ticket, group="grad") for lr in self.learners]
        started: list = []

        def start() -> None:
            started.extend(p.call(lr, "train_staged", None, ticket, group="train")
                           for lr in self.learners)

        def drawn() -> None:
            p.get(staged)

        def wait() -> dict:
            if not started:
                start()
            out = _merge_losses(p.get(started), self.objectives)
            if self.check():  # a restarted learner lost its staged batches
                out["updates"] = 0
            return out

        return StagedTraining(wait, start, drawn)

    def jacobian(self, genomes: np.ndarray) -> np.ndarray:
        ref = self.placement.put(np.asarray(genomes, np.float32))
        # rows in self.rows order
        return self._guarded(lambda: np.concatenate(self._all("jacobian", ref), axis=1))

    def greedy_genome(self) -> np.ndarray:
        p = self.placement
        return self._guarded(lambda: p.get(p.call(self._fitness_learner(), "greedy_genome",
                                                  group="grad")))

    def pg_variation(self, genomes, steps: int, lr: float, num_states: int) -> np.ndarray:
        p = self.placement
        return self._guarded(lambda: p.get(p.call(self._fitness_learner(), "pg_variation",
                                                  genomes, steps, lr, num_states,
                                                  group="grad")))

    def stats(self) -> dict:
        outs = self._all("stats")
        merged = _merge_losses(outs, self.objectives)
        merged["updates"] = int(min(o["updates"] for o in outs))
        merged["busy_s"] = float(sum(o["busy_s"] for o in outs))
        merged["lr"] = float(outs[0]["lr"])
        return merged


def _merge_losses(outs: list[dict], objectives: list[list[int]]) -> dict:
    # Every learner does the same updates on its own critics: count them once.
    merged: dict = {"updates": int(min(o.get("updates", 0) for o in outs)) if outs else 0}
    if any("train_s" in o for o in outs):  # learners train side by side: the slowest
        merged["train_s"] = max(float(o.get("train_s", 0.0)) for o in outs)
    if not any("critic_loss" in o for o in outs):
        return merged
    for key in ("critic_loss", "actor_loss"):
        vals = []
        for o, objs in zip(outs, objectives):
            vals.extend(np.asarray(o.get(key, [np.nan] * len(objs)), np.float64).tolist())
        merged[key] = vals
    return merged

