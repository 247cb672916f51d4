"""Learner: owns a TD3 ensemble on its device and answers gradient requests.

The learner pulls training batches and gradient states from a sampler (the
in-process replay buffer, or an adapter over the replay actor) with
``size()``, ``sample(batch_size, num_batches, seed)`` and
``sample_states(n, seed)``. Every sample is drawn with a seed from the
learner's own RNG, so several learners sample reproducibly in any order.

Two modes:
- sync: the coordinator calls ``train(n)`` each iteration (reproducible);
- async: ``start_async()`` trains in a background thread from prefetched
  sample chunks; ``jacobian`` holds the lock for one pass only, so a gradient
  request waits at most one update.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

import numpy as np

from dqd_ray.roles import StagedTraining
from dqd_ray.roles.policy import PolicySpec

if TYPE_CHECKING:
    from dqd_ray.roles.td3 import TD3Ensemble

# torch is imported where a learner is made, not with this module: a process
# that only holds learner handles (the coordinator's) loads this module to
# deserialize them, and would otherwise pay for torch's import.


def pick_device(requested_gpus: float = 0.0) -> str:
    """``cuda`` when a GPU was requested (or assigned) and is visible, else ``cpu``."""
    import torch

    return "cuda" if requested_gpus > 0 and torch.cuda.is_available() else "cpu"


def learner_threads(cpus: float) -> int:
    """Torch intra-op threads of a CPU learner that asks for ``cpus`` CPUs: one
    per CPU, and one when it has a share of a core (or shares the workers')."""
    return max(1, round(float(cpus)))


def loss_metrics(stats: dict) -> dict:
    """Mean and per-objective critic/actor losses from learner stats (async mode)."""
    out = {}
    for key in ("critic_loss", "actor_loss"):
        if key in stats:
            vals = np.asarray(stats[key], np.float64)
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
            out[f"{key}_per_objective"] = vals.tolist()
    return out


class Learner:
    """TD3 critics for some objectives, trained from a sampler.

    Args:
        policy_spec: Policy architecture (actors mirror it).
        num_objectives: 1 + number of measures.
        td3_cfg: :class:`dqd_ray.config.TD3Config`.
        sampler: Replay sampler (see module docstring).
        device: Torch device, or ``"auto"`` (cuda if visible, else cpu).
        seed: Initialization and sampling seed. Learners that split the
            critics of one run share it: each agent is initialized from
            (seed, objective), and all learners draw the same batches and
            gradient states, so in sync mode a split group computes exactly
            what one learner would.
        objectives: Objectives owned by this learner (default: all).
        torch_threads: Intra-op threads for torch, set here in the actor's
            process (None keeps torch's default). The builder passes
            ``resources.torch_threads``, else for a CPU learner
            :func:`learner_threads` of the CPUs it asks Ray for.
    """

    def __init__(self, policy_spec: PolicySpec, num_objectives: int, td3_cfg, sampler=None, *,
                 device: str = "cpu", seed: int = 0, objectives: list[int] | None = None,
                 torch_threads: int | None = None):
        import torch

        from dqd_ray.roles.td3 import TD3Ensemble

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = td3_cfg
        self.sampler = sampler
        self._captured: dict | None = None  # a checkpoint's capture (capture_state)
        self.ensemble = TD3Ensemble(policy_spec, num_objectives, td3_cfg, device=device,
                                    seed=seed, objectives=objectives)
        self.objectives = self.ensemble.objectives
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.last_losses: dict = {}
        self._staged: dict | None = None
        self._frozen: TD3Ensemble | None = None  # see stage()
        self._stage_done = threading.Condition()
        self._stage_ticket: int | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.busy_s = 0.0
        # Changes when Ray restarts the actor (its node died): the group then
        # restores the critics from its snapshot.
        self.incarnation = uuid.uuid4().hex

    def incarnation_id(self) -> str:
        return self.incarnation

    def set_sampler(self, sampler) -> None:
        self.sampler = sampler

    def _seed(self) -> int:
        return int(self.rng.integers(0, 2**63 - 1))

    def ready(self) -> bool:
        return self.sampler is not None and self.sampler.size() >= max(1, self.cfg.learning_starts)

    # -- training ----------------------------------------------------------

    def train(self, num_updates: int) -> dict:
        """Sync mode: ``num_updates`` updates now (0 while the buffer is too small)."""
        if num_updates <= 0 or not self.ready():
            return {"updates": 0}
        batches = self.sampler.sample(self.cfg.batch_size, num_updates, self._seed())
        return self.train_on(batches)

    def stage_training(self, num_updates: int) -> "StagedTraining":
        """Samples the batches of ``num_updates`` updates now; trains on ``start()``.

        The coordinator stages at the start of an iteration (the experience up
        to the previous iteration, as the paper trains) and starts the updates
        while the batch is being evaluated.
        """
        staged = self.stage(num_updates)
        return StagedTraining(lambda: self.train_staged(staged))

    def stage(self, num_updates: int, ticket: int | None = None) -> int:
        """Samples and keeps the batches of ``num_updates`` updates; returns how many.

        ``ticket`` names this stage for :meth:`train_staged` (a group sends both
        calls at once, to two concurrency groups).

        The networks as they are now are kept aside (:meth:`_frozen_view`): until
        the next stage (or a state load), the jacobian, the greedy actor and PG
        variation come from them, so the updates may run, and finish, while the
        iteration asks for gradients, and the numbers are those of updates run
        after it.
        """
        self._staged = None
        self._frozen = None
        try:
            if num_updates > 0 and self.ready():
                batches = self.sampler.sample(self.cfg.batch_size, num_updates, self._seed())
                if self.ensemble.device.type == "cuda":  # copied while the batch is evaluated
                    batches = self.ensemble.to_device(batches)
                self._staged = batches
                with self._lock:
                    self._frozen = self._frozen_view()
                return num_updates
            return 0
        finally:
            with self._stage_done:
                self._stage_ticket = ticket
                self._stage_done.notify_all()

    def _frozen_view(self) -> TD3Ensemble:
        """The ensemble with copies of its actor and critic networks (the
        optimizers, targets and counters stay shared and are never used by
        gradient requests)."""
        view = copy.copy(self.ensemble)
        view.actor = copy.deepcopy(self.ensemble.actor)
        view.critic = copy.deepcopy(self.ensemble.critic)
        return view

    @contextlib.contextmanager
    def _networks(self):
        """The networks gradient requests use: the frozen copy while staged
        updates train the live ones, else the live ones (under the lock)."""
        frozen = self._frozen
        if frozen is not None:
            yield frozen
            return
        with self._lock:
            yield self.ensemble

    def train_staged(self, staged: int | None = None, ticket: int | None = None,
                     timeout_s: float = 600.0) -> dict:
        """Trains on the batches :meth:`stage` kept (none staged: no update).

        With a ``ticket``, first waits (at most ``timeout_s``) for the stage of
        that ticket to finish; a stage that never comes (a learner restarted
        in between) trains nothing, as a restarted learner's lost batches do.
        """
        if ticket is not None:
            with self._stage_done:
                if not self._stage_done.wait_for(lambda: self._stage_ticket == ticket,
                                                 timeout=timeout_s):
                    return {"updates": 0}
        batches, self._staged = getattr(self, "_staged", None), None
        if batches is None:
            return {"updates": 0}
        return self.train_on(batches)

    def train_on(self, batches: dict) -> dict:
        start = time.perf_counter()
        with self._lock:
            out = self.ensemble.train(batches)
        spent = time.perf_counter() - start
        self.busy_s += spent
        out["train_s"] = spent
        if not np.isfinite(out["actor_loss"]).any() and "actor_loss" in self.last_losses:
            out = {**out, "actor_loss": self.last_losses["actor_loss"]}  # keep the last one
        self.last_losses = out
        return out

    def start_async(self, batches_per_pull: int = 50) -> None:
        """Trains continuously in a background thread until :meth:`stop_async`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(batches_per_pull,), daemon=True)
        self._thread.start()

    def _loop(self, batches_per_pull: int) -> None:
        try:
            pending = None
            while not self._stop.is_set():
                if not self.ready() or self._over_ratio():
                    time.sleep(0.05)
                    continue
                if pending is None:
                    pending = self._pull(batches_per_pull)
                batches = pending()
                pending = self._pull(batches_per_pull)  # prefetch the next chunk
                for i in range(len(batches["obs"])):
                    if self._stop.is_set():
                        break
                    self.train_on({k: v[i:i + 1] for k, v in batches.items()})
        except BaseException as err:  # surfaced by stats()
            self._error = err

    def _over_ratio(self) -> bool:
        """Async mode with ``async_replay_ratio``: the updates so far have sampled
        that many transitions per transition added (checked once per chunk)."""
        ratio = getattr(self.cfg, "async_replay_ratio", None)
        if ratio is None:
            return False
        added = int(self.sampler.stats()["total_added"])
        return self.ensemble.updates * self.cfg.batch_size >= ratio * added

    def _pull(self, n: int) -> Callable[[], dict]:
        """Starts fetching ``n`` batches; the returned callable gives them.

        A sampler with ``sample_async`` (the replay actor's adapter) returns a
        future with ``get()``; a plain sampler (an in-process buffer) samples now.
        """
        fn = getattr(self.sampler, "sample_async", None)
        seed = self._seed()
        if fn is not None:
            return fn(self.cfg.batch_size, n, seed).get
        batches = self.sampler.sample(self.cfg.batch_size, n, seed)
        return lambda: batches

    def stop_async(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            self._thread = None

    def stats(self) -> dict:
        """Update count, busy time and last losses.

        Raises:
            RuntimeError: If background training failed (with its cause).
        """
        if self._error is not None:
            raise RuntimeError(f"background training failed: {self._error!r}") from self._error
        out = {"updates": self.ensemble.updates, "busy_s": self.busy_s,
               "objectives": list(self.objectives), "device": str(self.device),
               "lr": float(self.ensemble.critic_opt.param_groups[0]["lr"])}
        for k in ("critic_loss", "actor_loss"):
            if k in self.last_losses:
                out[k] = np.asarray(self.last_losses[k]).tolist()
        return out

    # -- gradients -----------------------------------------------------------

    def jacobian(self, genomes: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
        """``(G, len(objectives), D)`` uphill gradients of mean Q over buffer states.

        With an empty buffer (the first iteration: its experience enters the
        buffer at its end) the rows are random directions, drawn from this
        learner's seeded generator (one stream per objective), as the paper's
        code does; the emitter normalizes them, so they are uniform on the
        sphere."""
        if states is None:
            if self.sampler is None:
                raise RuntimeError("jacobian needs states: this learner has no replay buffer")
            if self.sampler.size() == 0:
                # One stream per objective: the same rows however the
                # objectives are split between learners.
                genomes, seed = np.asarray(genomes), self._seed()
                shape = (len(genomes), genomes.shape[1])
                return np.stack([np.random.default_rng([seed, j]).standard_normal(shape)
                                 for j in self.objectives], axis=1).astype(np.float32)
            states = self.sampler.sample_states(self.cfg.jacobian_states, self._seed())
        with self._networks() as nets:
            return nets.jacobian(np.asarray(genomes, np.float32), states)

    def pg_variation(self, genomes: np.ndarray, steps: int, lr: float,
                     num_states: int) -> np.ndarray:
        """PG variation of ``genomes`` up the fitness critic (see TD3Ensemble.pg_variation).

        Every step of every genome gets ``num_states`` fresh buffer states.
        """
        if 0 not in self.objectives:
            raise RuntimeError("this learner does not own the fitness agent")
        genomes = np.asarray(genomes, np.float32)
        g = len(genomes)
        if self.sampler is None or self.sampler.size() == 0:
            raise RuntimeError("PG variation needs states: the replay buffer is empty")
        states = self.sampler.sample_states(steps * g * num_states, self._seed())
        states = np.asarray(states, np.float32).reshape(steps, g, num_states, -1)
        with self._networks() as nets:
            return nets.pg_variation(genomes, states, lr, agent=self.objectives.index(0))

    def greedy_genome(self) -> np.ndarray:
        if 0 not in self.objectives:
            raise RuntimeError("this learner does not own the fitness agent")
        with self._networks() as nets:
            return nets.greedy_genome(self.objectives.index(0))

    # -- probes ----------------------------------------------------------------

    def probe_batch(self, size: int, seed: int) -> dict | None:
        """One batch of the buffer drawn with its own seed (the training stream
        is untouched); None while the buffer is below ``td3.learning_starts``."""
        if not self.ready():
            return None
        batches = self.sampler.sample(size, 1, int(seed))
        return {k: np.array(v[0]) for k, v in batches.items()}

    def probe_loss(self, batch: dict) -> float:
        """Mean TD loss of this learner's critics on ``batch`` (no update)."""
        with self._lock:
            return float(np.mean(self.ensemble.td_loss(batch)))

    def snapshot(self, probe: dict | None = None) -> tuple[dict, float | None]:
        """:meth:`state_dict` and, of the same weights (background training
        waits), the critic loss on ``probe``."""
        with self._lock:
            state = _to_cpu(self.ensemble.state_dict())
            loss = None if probe is None else float(np.mean(self.ensemble.td_loss(probe)))
        state["sample_rng"] = self.rng.bit_generator.state
        return state, loss

    def sealed_snapshot(self, probe: dict | None = None) -> tuple[bytes, int, float | None]:
        """:meth:`snapshot` pickled to bytes, with its update count: the learner
        group keeps it in the coordinator's process, which then holds no tensor
        and never imports torch (see :meth:`load_sealed_snapshot`)."""
        state, loss = self.snapshot(probe)
        return pickle.dumps(state, protocol=5), int(state.get("updates", 0)), loss

    def load_sealed_snapshot(self, sealed: bytes) -> None:
        """Loads what :meth:`sealed_snapshot` made (in this run, by a learner of
        the same objectives; never a file)."""
        self.load_state_dict(pickle.loads(sealed))

    # -- state -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """The ensemble's state with every tensor on the CPU: it travels to the
        driver and the coordinator, which may run on nodes without a GPU."""
        return self.snapshot()[0]

    def capture_state(self) -> None:
        """Step one of a checkpoint: a copy of :meth:`state_dict` (every tensor
        copied, so training may go on), kept for :meth:`captured_state`."""
        state, _ = self.snapshot()
        self._captured = _copied(state)

    def captured_state(self) -> dict:
        """Step two: the state :meth:`capture_state` took."""
        state, self._captured = self._captured, None
        if state is None:
            raise RuntimeError("captured_state() without capture_state() before it")
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self._staged = self._frozen = None
        rng_state = state.pop("sample_rng", None)
        with self._lock:
            self.ensemble.load_state_dict(state)
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state


def _copied(x):
    """``x`` with every tensor copied (state_dict's CPU tensors are the live ones)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copied(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copied(v) for v in x)
    return copy.deepcopy(x)


def _to_cpu(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x
