"""The rollout workers as one evaluator, over any placement."""

from __future__ import annotations

import numpy as np

from dqd_ray.runtime.placement import InProcess


class PooledEvaluator:
    """Evaluates genomes on the rollout workers, a few genomes per call.

    On Ray, chunks go to actors as they free up (two queued per actor), so
    long and short episodes balance; actors restart and retry, and a chunk's
    result is taken once. In process the chunks run one after another. In
    keyed mode (sync learners) transitions are staged per genome and the
    replay buffer commits them in genome order after each call, so which
    worker ran which genome changes nothing.
    """

    #: What the rollout workers run: the coordinator builds ES batches in it.
    genome_dtype = np.float32

    #: Steps a call should hold at least: a call has a fixed cost (the Ray
    #: call, the transitions' last batch and its wait), which episodes of a
    #: fallen robot (tens of steps) do not amortize over ``chunk`` genomes.
    min_call_steps = 2000

    def __init__(self, placement, workers: list, replay, chunk: int = 4, keyed: bool = False):
        self.placement, self.workers, self.replay = placement, list(workers), replay
        self.chunk, self.keyed = chunk, keyed
        self.calls = 0
        self.mean_length: float | None = None  # steps per episode of the last call
        # Called once before the next commit: staged critic batches must be drawn
        # before the buffer takes new experience (see StagedTraining.drawn).
        self.before_commit = None
        self._hold = False

    def hold_commit(self) -> None:
        """The next :meth:`evaluate` leaves its transitions staged: the call after
        it commits both (in key order: the first call's first). The coordinator
        holds the first half's experience until the iteration's end, so that
        the jacobian, like the critic updates, sees the experience up to the
        previous iteration."""
        self._hold = True

    def evaluate(self, genomes: np.ndarray, seeds: np.ndarray, record: bool = True,
                 **options) -> dict:
        """One episode per genome; ``options`` go to :meth:`RolloutWorker.evaluate`
        (``action_noise``, and ``collect_obs``, one flag per genome)."""
        p = self.placement
        genomes = np.ascontiguousarray(genomes, np.float32)
        seeds = np.asarray(seeds)
        n = len(genomes)
        ref = p.put(genomes)
        if isinstance(p, InProcess):  # one call per worker: its envs step in lockstep
            parts = [a for a in np.array_split(np.arange(n), len(self.workers)) if len(a)]
        else:
            size = self.chunk_size(n)
            parts = [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
        todo = list(range(len(parts)))
        running: dict = {}
        free = list(range(len(self.workers))) * 2
        results: dict[int, dict] = {}
        call = self.calls
        self.calls += 1
        keyed = self.keyed and record
        while todo or running:
            while todo and free:
                w, part = free.pop(0), todo.pop(0)
                idx = parts[part]
                keys = [(call, int(i)) for i in idx] if keyed else None
                opts = {k: (np.asarray(v)[idx] if np.ndim(v) else v) for k, v in options.items()}
                fut = p.call(self.workers[w], "evaluate_indices", ref, idx, seeds[idx], keys,
                             record, opts or None)
                running[id(fut)] = (fut, w, part)
            done, _ = p.wait_any([f for f, _, _ in running.values()])
            _, w, part = running.pop(id(done))
            results[part] = p.get(done)
            free.append(w)
        hold, self._hold = self._hold, False
        if keyed and not hold:
            hook, self.before_commit = self.before_commit, None
            if hook is not None:
                hook()
            p.get(p.call(self.replay, "commit"))
        k = results[0]["measures"].shape[1] if n else 0
        out = {"fitness": np.empty(n), "measures": np.empty((n, k)),
               "length": np.empty(n, np.int64), "valid": np.empty(n, bool), "env_steps": 0}
        per_genome = ["fitness", "measures", "length", "valid"]
        if options.get("collect_obs") is not None and n:
            per_genome += ["obs_sum", "obs_sumsq", "obs_count"]
            for key in per_genome[4:]:
                first = results[0][key]
                out[key] = np.empty((n, *first.shape[1:]), first.dtype)
        for part, res in results.items():
            idx = parts[part]
            for key in per_genome:
                out[key][idx] = res[key]
            out["env_steps"] += int(res["env_steps"])
        if n:
            self.mean_length = out["env_steps"] / n
        return out

    def chunk_size(self, n: int) -> int:
        """Genomes per call for a batch of ``n`` on Ray.

        ``chunk`` genomes, more when the last batch's episodes were short (so
        a call holds about :attr:`min_call_steps` steps), and never so many
        that a worker would get fewer than two calls: the calls still balance
        long and short episodes. Smaller chunks when there are more workers
        than chunks: every worker gets work (96 workers, 101 genomes: chunks
        of 2, not 4). Which worker runs which genome changes no result (keyed
        transitions, one seed per genome)."""
        workers = max(1, len(self.workers))
        size = self.chunk
        if self.mean_length:
            size = max(size, int(self.min_call_steps // max(self.mean_length, 1.0)))
            size = min(size, max(self.chunk, -(-n // (2 * workers))))
        return max(1, min(size, -(-n // workers)))

