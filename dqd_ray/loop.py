"""The one driver loop: run or resume an experiment.

Shared by ``dqd-ray run``/``resume`` (the CLI only parses arguments) and the
Tune trainable. Validates the config before Ray starts, builds the system
with :func:`dqd_ray.runtime.build` (Ray actors, or everything in process with
``backend="inprocess"``), loops over
iterations until the budget, writes metrics (progress bar, metrics.jsonl,
wandb) and checkpoints, and shuts down cleanly.

Stopping: the first Ctrl-C (SIGINT) or SIGTERM (``ray job stop``, cluster
schedulers) lets the running iteration finish, then checkpoints it under its
own number and exits: the run resumes exactly where it stopped. A second
signal stops at once, without checkpointing the unfinished iteration (the
last checkpoint written stays the resume point).

Run directory::

    RUN_DIR/config.yaml       resolved config
    RUN_DIR/metrics.jsonl     one line per iteration
    RUN_DIR/summary.json      final metrics
    RUN_DIR/archive.png       final heatmap
    RUN_DIR/best_elite.gif    the best elite, replayed (logging.final_gif)
    RUN_DIR/checkpoints/      ckpt_<iteration>/ (see checkpoint.py)
    RUN_DIR/wandb/            when logging.wandb is on
    RUN_DIR/.lock             while a process runs it (see rundir.RunLock)

Checkpoints: the state is captured between two iterations and written in the
background while the next one runs (:class:`~dqd_ray.state.writer.CheckpointWriter`),
one write at a time; every way out of the loop waits for the write in flight,
and a failed write stops the run naming the checkpoint. Metrics
``checkpoint_capture_s`` (this iteration's capture, 0 without one) and
``checkpoint_write_s`` (the newest background write that ended) say what they cost.

Crash safety: iteration N's metrics line is written and fsynced before
checkpoint N is written, so no checkpoint is ever ahead of the metrics; a
crash during a write leaves the previous checkpoint as the resume point; a
sink given a checkpoint (Tune's report) gets it complete. A resume from an
older checkpoint moves the lines past it to ``metrics.abandoned.jsonl``. A
torn last metrics line (a crash in the middle of its write) is dropped with a
warning; files that are rewritten (``config.yaml``, ``metrics.jsonl``,
``summary.json``) are replaced atomically.
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from dqd_ray import metrics
from dqd_ray.config import ConfigError, ExperimentConfig, build_config, to_yaml
from dqd_ray.envs import env_metadata
from dqd_ray.logging import JsonlSink, ProgressSink, WandbSink
from dqd_ray.runtime.placement import init_ray, make_placement  # noqa: F401 - init_ray: re-exported
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state.rundir import (  # RunDirInUse: what a second `run`/`resume` raises
    RunDirInUse,  # noqa: F401
    RunLock,
    append_durably,
    atomic_write_text,
    parse_jsonl,
    read_jsonl,
    torn_warning,
)
from dqd_ray.state.writer import WRITE_TIMEOUT_S, CheckpointWriter
from dqd_ray.stopping import GracefulStop, RunFailed, _cause  # RunFailed: re-exported

# Fields a resume may change; anything else must match the original run.
RESUMABLE = ("iterations", "evaluations", "logging", "checkpoint")

Backend = Literal["ray", "inprocess"]

def reported_metrics(cfg: ExperimentConfig) -> frozenset:
    """Every metric name a run of ``cfg`` reports each iteration."""
    return metrics.reported_metrics(cfg.needs())


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.preset or cfg.algorithm.name
    return Path("runs") / f"{stamp}_{name}_{cfg.env.id.split('BulletEnv')[0]}_s{cfg.seed}"


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: run has {a!r}, requested {b!r}"]


def make_system(cfg: ExperimentConfig, backend: Backend, torch_threads: int | None = None,
                run_dir: Path | None = None):
    from dqd_ray.runtime import build

    return build(cfg, backend, torch_threads=torch_threads, run_dir=run_dir)


def _under_lock(run_dir: Path, make):
    """``make()`` with ``run_dir``'s lock held (a directory a running process
    holds is refused); the lock stays with the Experiment made, and is
    released if making it fails."""
    lock = RunLock(run_dir).acquire()
    try:
        exp = make()
    except BaseException:
        lock.release()
        raise
    exp._lock = lock
    return exp


class Experiment:
    """One run directory and the loop that fills it."""

    #: The longest wait for one background checkpoint write.
    checkpoint_timeout_s: float = WRITE_TIMEOUT_S

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, backend: Backend = "ray",
                 address: str | None = None, num_cpus: int | None = None,
                 torch_threads: int | None = None, resume_state: tuple | None = None,
                 wandb_run: dict | None = None):
        self.cfg, self.run_dir, self.backend = cfg, Path(run_dir), backend
        self.address, self.num_cpus, self.torch_threads = address, num_cpus, torch_threads
        self.resume_state = resume_state
        self.wandb_run = wandb_run or {}  # WandbSink keywords (a Tune trial's name, group)
        self.meta = env_metadata(cfg.env.id)
        self._state: dict | None = None  # a checkpoint already read into memory
        self._fallback = None  # resume: the manifest check older checkpoints must pass
        self._lock = RunLock(self.run_dir)  # create/resume/restore take it; run() releases it

    # -- entry points ------------------------------------------------------------

    @classmethod
    def create(cls, cfg: ExperimentConfig, run_dir: str | Path | None = None, **kw) -> "Experiment":
        run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)

        def make() -> Experiment:
            if (run_dir / "config.yaml").exists():
                raise ConfigError(f"{run_dir} already holds a run; use `dqd-ray resume "
                                  f"{run_dir}` or choose another --out")
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
            atomic_write_text(run_dir / "run_id", uuid.uuid4().hex[:12])
            return cls(cfg, run_dir, **kw)

        return _under_lock(run_dir, make)

    @classmethod
    def resume(cls, run_dir: str | Path, sets: list[str] | None = None, **kw) -> "Experiment":
        run_dir = Path(run_dir)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
        return _under_lock(run_dir, lambda: cls._resume_locked(run_dir, sets, **kw))

    @classmethod
    def _resume_locked(cls, run_dir: Path, sets: list[str] | None, **kw) -> Experiment:
        cfg_path = run_dir / "config.yaml"
        original = build_config(file=cfg_path)
        requested = build_config(file=cfg_path, sets=sets)
        a, b = original.model_dump(mode="json"), requested.model_dump(mode="json")
        for key in RESUMABLE:
            a.pop(key, None)
            b.pop(key, None)
        diffs = _diff(a, b)
        if diffs:
            raise ConfigError("resume cannot change these settings of the run:\n  "
                              + "\n  ".join(diffs)
                              + f"\n(only {', '.join(RESUMABLE)} may change on resume)")

        def same_config(manifest: dict) -> None:
            # Before any file is read: the files' limits come from this config.
            saved = {k: v for k, v in manifest["config"].items() if k not in RESUMABLE}
            diffs = _diff(saved, {k: v for k, v in original.model_dump(mode="json").items()
                                  if k not in RESUMABLE})
            if diffs:
                raise ConfigError(f"{run_dir}/config.yaml differs from the checkpoint's "
                                  "config:\n  " + "\n  ".join(diffs))

        # The newest checkpoint that verifies and loads; refused ones are
        # skipped with a warning naming the file and the problem.
        refused: list[str] = []
        found = ckpt.latest_loadable(run_dir / "checkpoints", check=same_config,
                                     refused=refused)
        if found is None:
            raise ckpt.CheckpointError(f"{run_dir}: no intact checkpoint to resume from"
                                       + "".join(f"\n  {r}" for r in refused))
        path, manifest, state = found
        atomic_write_text(run_dir / "config.yaml", to_yaml(requested))
        exp = cls(requested, run_dir, resume_state=(path, manifest), **kw)
        exp._state = state
        exp._fallback = same_config  # a checkpoint the system refuses: try older ones
        return exp

    @classmethod
    def restore(cls, cfg: ExperimentConfig, run_dir: str | Path, checkpoint: str | Path,
                **kw) -> "Experiment":
        """Continues from ``checkpoint`` under ``cfg``, which may differ from the
        checkpoint's config (a Tune restore: a retry, ``Tuner.restore``, or a
        PBT exploit that copies another trial's checkpoint with new values).

        The checkpoint is verified and read into memory at once (its directory
        may be temporary). Settings that changed are printed and appended to
        ``run_dir/restores.jsonl``; a change the saved state cannot take (a
        network size, a replay capacity) fails when the state is loaded, as a
        :class:`~dqd_ray.state.checkpoint.CheckpointError`.
        """
        path, run_dir = Path(checkpoint), Path(run_dir)
        manifest = ckpt.verify(path)
        state = ckpt.load_checkpoint(path, manifest)
        run_dir.mkdir(parents=True, exist_ok=True)
        exp = _under_lock(run_dir, lambda: cls._restore_locked(cfg, run_dir, path, manifest,
                                                               **kw))
        exp._state = state
        return exp

    @classmethod
    def _restore_locked(cls, cfg: ExperimentConfig, run_dir: Path, path: Path, manifest: dict,
                        **kw) -> Experiment:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        if not (run_dir / "run_id").exists():
            atomic_write_text(run_dir / "run_id", uuid.uuid4().hex[:12])
        saved = {k: v for k, v in manifest["config"].items() if k not in RESUMABLE}
        now = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE}
        changed = _diff(saved, now)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(path),
                  "iteration": int(manifest["iteration"]), "changed": changed}
        append_durably(run_dir / "restores.jsonl", json.dumps(record) + "\n")
        if changed:
            print(f"restoring {path} (iteration {manifest['iteration']}) with changed "
                  "settings:\n  " + "\n  ".join(changed))
        return cls(cfg, run_dir, resume_state=(path, manifest), **kw)

    # -- the loop ------------------------------------------------------------------

    def _budget_left(self, m: dict | None) -> bool:
        if m is None:
            return True
        if m["iteration"] >= self.cfg.iterations:
            return False
        return self.cfg.evaluations is None or m["evaluations"] < self.cfg.evaluations

    def _capture(self, system, writer: CheckpointWriter):
        """The run's state, captured (``collect()`` gathers it, in the writer's
        thread), and the seconds the capture took, once the write in flight (if
        any) has ended: at most one captured state waits in memory."""
        writer.wait()
        t0 = time.perf_counter()
        collect = system.capture(save_replay=self.cfg.checkpoint.save_replay)
        extra = {"wall_s": self.wall_s}

        def state() -> dict:
            return {**collect(), "extra": extra}

        return state, time.perf_counter() - t0

    def _save(self, system, writer: CheckpointWriter, iteration: int) -> Path:
        """Captures the state now and writes it in the background (see :meth:`_capture`)."""
        state, capture_s = self._capture(system, writer)
        return writer.submit(iteration, state, capture_s)

    def run(self, sinks: Sequence = ()) -> dict:
        """Iterates until the budget or a stop signal; returns the summary.

        Holds the run directory's lock (taken by create/resume/restore, or
        here) until it returns.

        Args:
            sinks: Extra metric sinks (``log(metrics, archive, checkpoint)``,
                ``wants_archive(iteration)``, ``close()``), after the built-in ones.
        """
        self._lock.acquire()
        try:
            return self._run(sinks)
        finally:
            self._lock.release()

    def _run(self, sinks: Sequence) -> dict:
        cfg = self.cfg
        if (self.run_dir / "metrics.jsonl").exists():  # a corrupt line (not a torn last one)
            parse_jsonl(self.run_dir / "metrics.jsonl")  # stops the run before anything starts
        state = None
        if self._state is not None:
            state, self._state = self._state, None
        elif self.resume_state is not None:  # read and checked before anything starts
            state = ckpt.load_checkpoint(*self.resume_state)
        make_placement(self.backend, cfg.resources).connect(self.address, self.num_cpus)
        system = make_system(cfg, self.backend, self.torch_threads, self.run_dir)
        start_iter, self.wall_s = 0, 0.0
        if state is not None:
            path, manifest = self.resume_state
            while True:
                try:
                    system.load(state)
                    break
                except Exception as err:  # noqa: BLE001 - any restore failure is a bad checkpoint
                    refusal = ckpt.restore_refusal(path, err)
                    older = None
                    if self._fallback is not None:  # a resume: the previous intact one
                        older = ckpt.latest_loadable(self.run_dir / "checkpoints",
                                                     older_than=path, check=self._fallback)
                    if older is None:
                        system.close()
                        raise refusal from err
                    warnings.warn(f"skipping checkpoint: {refusal}", stacklevel=2)
                    print(f"warning: skipping checkpoint: {refusal}")
                    path, manifest, state = older
                    self.resume_state = (path, manifest)
            start_iter = int(manifest["iteration"])
            self.wall_s = float(state["extra"].get("wall_s", 0.0))
            print(f"resumed from {path} (iteration {start_iter})")
        self._truncate_metrics(start_iter)
        extra_sinks = list(sinks)
        sinks = [JsonlSink(self.run_dir / "metrics.jsonl"),
                 ProgressSink(cfg.iterations, start_iter, cfg.logging.progress_bar)]
        dims = cfg.env.resolved_dims()
        if cfg.logging.wandb:
            run_id = (self.run_dir / "run_id").read_text().strip()
            kw = {"resume": self.resume_state is not None, **self.wandb_run}
            run_id = kw.pop("id", run_id)
            sinks.append(WandbSink(self.run_dir, cfg, run_id, dims, self.meta.measure_names,
                                   **kw))
        sinks += extra_sinks
        last: dict | None = None
        if start_iter >= cfg.iterations:
            last = {"iteration": start_iter, "evaluations": 0}
        saved_at = start_iter
        interrupted = hard_stop = False
        failed: BaseException | None = None
        writer = CheckpointWriter(self.run_dir / "checkpoints", cfg.model_dump(mode="json"),
                                  keep=cfg.checkpoint.keep, timeout_s=self.checkpoint_timeout_s,
                                  previous=start_iter or None)
        self.checkpoint_writer = writer  # its records: capture and write seconds, bytes
        with GracefulStop() as stop:
            try:
                system.start()
                prev = system.system_stats()
                while self._budget_left(last) and stop.requested is None:
                    t0 = time.perf_counter()
                    m = system.iteration()
                    dt = time.perf_counter() - t0
                    self.wall_s += dt
                    now = system.system_stats()
                    m.update(self._throughput(m, dt, prev, now))
                    prev = now
                    m["wall_s"] = self.wall_s
                    last = m
                    wanted = any(s.wants_archive(m["iteration"]) for s in sinks)
                    archive = system.archive() if wanted else None
                    state, capture_s = None, 0.0
                    if m["iteration"] % cfg.checkpoint.every == 0:
                        state, capture_s = self._capture(system, writer)
                    m["checkpoint_capture_s"] = capture_s
                    m["checkpoint_write_s"] = writer.last_write_s
                    # metrics.jsonl first (fsynced), then the checkpoint (written in the
                    # background), then the sinks that take it (Tune's report), once it
                    # is complete: a crash in between never leaves a checkpoint whose
                    # iteration has no metrics line.
                    first = [s for s in sinks if getattr(s, "before_checkpoint", False)]
                    for s in first:
                        s.log(m, archive, checkpoint=None)
                    saved = None
                    if state is not None:
                        saved = writer.submit(m["iteration"], state, capture_s)
                        saved_at, state = m["iteration"], None
                    for s in sinks:
                        if s in first:
                            continue
                        if saved is not None and getattr(s, "uses_checkpoint", True):
                            writer.wait()  # raises if the write failed
                            if not writer.written(saved):  # skipped: a role restarted
                                saved = None
                        s.log(m, archive, checkpoint=saved)
            except KeyboardInterrupt:
                # A second signal (or Ctrl-C where no handler could be installed):
                # an iteration may be half done, so its state is not saved. The
                # write in flight (an earlier iteration's) is waited for.
                interrupted = hard_stop = True
                write_error = self._drain(writer)
                done = writer.last_iteration
                print(f"\nstopped at once; resume point: the checkpoint of iteration {done}"
                      if done else "\nstopped at once; no checkpoint was written yet",
                      flush=True)
                if write_error is not None:
                    raise write_error from write_error.__cause__
            except Exception as err:
                # A role failed or missed a deadline mid-iteration: its state is
                # half an iteration, and a role may not answer at all, so nothing
                # is saved or plotted; the last checkpoint written stays the resume
                # point (the write in flight, if any, is waited for first).
                failed = err
                hard_stop = True
                write_error = self._drain(writer)
                stopped = RunFailed(self._failure_message(err, writer.last_iteration or 0))
                if write_error is not None:
                    stopped.add_note(str(write_error))
                raise stopped from err
            finally:
                interrupted = interrupted or stop.requested is not None
                try:
                    try:
                        if (not hard_stop and last is not None
                                and last["iteration"] != saved_at and "qd_score" in last):
                            self._save(system, writer, last["iteration"])
                            saved_at = last["iteration"]
                        # After a hard stop the roles may be mid-iteration: no archive
                        # plot. The plot and GIF are made while the last checkpoint is
                        # written.
                        summary = self._summary(system, last, interrupted, plot=not hard_stop,
                                                sinks=sinks, failed=failed)
                    except BaseException as err:
                        write_error = self._drain(writer)
                        if write_error is not None:
                            err.add_note(str(write_error))
                        raise
                    writer.close()  # raises if the last write failed
                    if interrupted and not hard_stop and writer.last_iteration:
                        print(f"checkpointed iteration {writer.last_iteration}; continue with "
                              f"`dqd-ray resume {self.run_dir}`", flush=True)
                finally:
                    for s in sinks:
                        s.close()
                    system.close()
        return summary

    @staticmethod
    def _drain(writer: CheckpointWriter) -> ckpt.CheckpointError | None:
        """Waits for the write in flight (a stop on another error); returns
        its failure, printed, for the caller to raise or attach."""
        try:
            writer.close()
        except ckpt.CheckpointError as err:
            print(f"\n{err}", flush=True)
            return err
        return None

    def _failure_message(self, err: BaseException, saved_at: int) -> str:
        from dqd_ray.runtime.waits import CallTimeoutError

        cause = _cause(err)
        what = str(cause).strip().splitlines()
        text = what[-1] if not isinstance(cause, CallTimeoutError) else " ".join(what)
        where = (f"the checkpoint of iteration {saved_at} stays the resume point: "
                 f"`dqd-ray resume {self.run_dir}`" if saved_at else
                 "no checkpoint was written yet")
        return f"the run stopped: {text or type(cause).__name__}; {where}"

    def _truncate_metrics(self, start_iter: int) -> None:
        """Drops metric lines past the resume point (an abandoned continuation,
        moved to ``metrics.abandoned.jsonl``) and a torn last line (with a
        warning), so that the run appends to whole lines. The file is
        replaced atomically; the abandoned lines are fsynced before."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows, torn = parse_jsonl(path)
        if torn is not None:
            torn_warning(path, torn)
        past = [row.get("iteration", 0) > start_iter for _, row in rows]
        data = path.read_bytes()
        unterminated = bool(data) and not data.endswith(b"\n")
        if not (any(past) or torn is not None or unterminated):
            return
        dropped = [ln for (ln, _), p in zip(rows, past) if p]
        if dropped:
            append_durably(self.run_dir / "metrics.abandoned.jsonl", "\n".join(dropped) + "\n")
        atomic_write_text(path, "".join(ln + "\n" for (ln, _), p in zip(rows, past) if not p))

    def _throughput(self, m: dict, dt: float, prev: dict, now: dict) -> dict:
        steps = m["iteration_env_steps"]
        workers = max(1, now["num_rollout_workers"])
        busy = now["worker_busy_s"] - prev["worker_busy_s"]
        updates = now["critic_updates"] - prev["critic_updates"]
        coord_s = max(0.0, m["iteration_s"] - m["rollout_s"] - m["gradient_s"] - m["train_s"])
        return {
            "env_steps_per_s": steps / dt if dt > 0 else 0.0,
            "evaluations_per_s": m["iteration_evaluations"] / dt if dt > 0 else 0.0,
            "critic_updates_per_s": updates / dt if dt > 0 else 0.0,
            "critic_updates_total": now["critic_updates"],
            "time_rollout_s": m["rollout_s"], "time_gradient_s": m["gradient_s"],
            "time_train_s": m["train_s"], "time_coordinator_s": coord_s,
            "worker_idle_frac": max(0.0, 1.0 - busy / (workers * dt)) if dt > 0 else 0.0,
            "replay_size": now["replay_size"],
            # Ray restarted these actors (their node died) during this process's run.
            "worker_restarts": now["worker_restarts"], "replay_restarts": now["replay_restarts"],
            # rollout workers whose envs step in C (dqd_ray.envs.compiled)
            "rollout_workers_compiled": now["rollout_workers_compiled"],
            **({"td3_lr": now["td3_lr"]} if "td3_lr" in now else {}),
        }

    def _summary(self, system, last: dict | None, interrupted: bool, plot: bool = True,
                 sinks: Sequence = (), failed: BaseException | None = None) -> dict:
        summary = {"run_dir": str(self.run_dir), "interrupted": interrupted,
                   "final": last, "wall_s": self.wall_s}
        if failed is not None:
            summary.update(failed=True, error=" ".join(str(_cause(failed)).split()))
        if plot and last is not None and "qd_score" in last:
            summary["media"] = self._final_media(system.archive(), last)
            for s in sinks:
                if hasattr(s, "log_media"):
                    s.log_media(summary["media"], int(last["iteration"]))
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        return summary

    def _final_media(self, archive: dict, last: dict) -> dict:
        """The final heatmap (``archive.png``) and a GIF of the best elite
        (``best_elite.gif``, replayed with its archived seed)."""
        import matplotlib.pyplot as plt

        from dqd_ray.analysis.results import render_episode, write_gif
        from dqd_ray.analysis.viz import heatmap

        cfg, media = self.cfg, {}
        fig = heatmap(archive, cfg.env.resolved_dims(), path=self.run_dir / "archive.png",
                      names=self.meta.measure_names, ranges=cfg.env.resolved_ranges(),
                      title=f"{cfg.preset or cfg.algorithm.name}, {cfg.env.id}, iteration "
                      f"{last['iteration']}: {len(archive['objective'])} elites")
        plt.close(fig)
        media["archive"] = str(self.run_dir / "archive.png")
        if cfg.logging.final_gif and len(archive["objective"]):
            i = int(np.argmax(archive["objective"]))
            try:
                frames, fitness, _ = render_episode(
                    cfg, archive["solution"][i], int(archive["seed"][i]),
                    steps=cfg.logging.gif_steps, frame_every=cfg.logging.gif_frame_every)
                media["best_elite"] = str(write_gif(frames, self.run_dir / "best_elite.gif"))
                media["best_elite_fitness"] = {"archived": float(archive["objective"][i]),
                                               "replayed": fitness}
            except Exception as err:  # noqa: BLE001 - a failed GIF never costs the run's results
                print(f"warning: no GIF of the best elite ({err})")
        return media


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's metric lines; a torn last line is dropped with a warning (see
    :func:`dqd_ray.state.rundir.read_jsonl`)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")

