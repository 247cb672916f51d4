"""Checkpoints written in the background, one at a time, never lost in silence.

The loop captures a run's state between two iterations (milliseconds: each
role keeps a copy of its own state, see
:meth:`~dqd_ray.runtime.builder.System.capture`) and hands it to a
:class:`CheckpointWriter`, which writes it (:func:`~dqd_ray.state.checkpoint.save_checkpoint`:
temporary directory, fsync, rename, prune) in a thread while the next
iteration runs. The rules:

- at most one write is in flight: :meth:`~CheckpointWriter.submit` first waits
  for the one before it, so at most two states are in memory (the one being
  written and the live one);
- :meth:`~CheckpointWriter.wait` and :meth:`~CheckpointWriter.close` wait for
  the write in flight, at most ``timeout_s`` seconds: a write that takes longer
  is given up with a :class:`~dqd_ray.state.checkpoint_files.CheckpointError`
  that says so (the thread is a daemon: it never keeps the process alive);
- a write that failed raises, at the next ``submit``, ``wait`` or ``close``, a
  ``CheckpointError`` naming the checkpoint and the error;
- a crash (or a given-up write) leaves at most a ``.tmp_ckpt_*`` directory,
  removed by the next write: the previous checkpoint stays the resume point.

For each checkpoint written, :attr:`CheckpointWriter.records` keeps
``{"iteration", "path", "capture_s", "collect_s", "write_s", "bytes"}``: the
seconds the loop took to capture the state, the seconds the background
thread took to gather it from the roles (when it was handed a ``collect``
callable), the seconds of the whole background write (gathering, sharing
arrays, writing, fsyncing, renaming, pruning) and the bytes of the
checkpoint's files.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dqd_ray.state import checkpoint as ckpt


class CaptureLost(RuntimeError):
    """A captured state could not be gathered: a role restarted (its node died)
    between the capture and the gathering, and its copy went with it. The
    checkpoint is skipped, with a warning; the previous one stays the resume
    point and the next one is taken as usual."""


#: The longest wait for one checkpoint write (a replay buffer of 10^6
#: transitions and an archive of 10^3 genomes are ~0.5 GB: seconds to a few
#: minutes on a slow shared disk).
WRITE_TIMEOUT_S = 900.0


def checkpoint_bytes(path: Path) -> int:
    """The bytes of a checkpoint's files (manifest included)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


class CheckpointWriter:
    """Writes checkpoints of one run in a background thread, one at a time.

    Args:
        root: The run's ``checkpoints`` directory.
        config: The resolved config (JSON-able), stored in each manifest.
        keep: Checkpoints kept (older ones are pruned after each write).
        timeout_s: The longest :meth:`wait` for one write.
        write: ``write(root, iteration, state, config, keep=keep) -> Path``;
            default :func:`dqd_ray.state.checkpoint.save_checkpoint` (looked up
            at each write).
        previous: The iteration of the checkpoint the run resumed from, if any
            (named as the resume point when a write fails).
    """

    def __init__(self, root: str | os.PathLike, config: dict, keep: int = 3, *,
                 timeout_s: float = WRITE_TIMEOUT_S,
                 write: Callable[..., Path] | None = None, previous: int | None = None):
        self.root, self.config, self.keep = Path(root), config, keep
        self.timeout_s, self.previous = timeout_s, previous
        self._write = write
        self.records: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._job: dict[str, Any] | None = None  # the write in flight (or just ended)
        self._closed = False

    # -- what the loop reads -----------------------------------------------------

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    @property
    def last_iteration(self) -> int | None:
        """The iteration of the newest checkpoint written completely (the resume point)."""
        return self.records[-1]["iteration"] if self.records else self.previous

    @property
    def last_write_s(self) -> float:
        """Seconds of the newest background write that ended well (0 before the first)."""
        job, thread = self._job, self._thread
        if job is not None and thread is not None and not thread.is_alive() \
                and job["error"] is None and "write_s" in job:  # not lost (CaptureLost)
            return job["write_s"]
        return self.records[-1]["write_s"] if self.records else 0.0

    # -- writing -----------------------------------------------------------------

    def submit(self, iteration: int, state: dict[str, Any] | Callable[[], dict[str, Any]],
               capture_s: float = 0.0) -> Path:
        """Waits for the write in flight (raising its error), then starts writing
        ``state`` as checkpoint ``iteration`` in the background.

        ``state`` may be a callable that returns it (a captured state still to
        be gathered from the roles: see :meth:`dqd_ray.runtime.builder.System.capture`);
        the writer's thread calls it first, and the seconds it takes count in
        ``collect_s`` (and in ``write_s``).

        Returns:
            The path the checkpoint will have once written (give it to a sink
            only after :meth:`wait`).
        """
        if self._closed:
            raise RuntimeError("this CheckpointWriter is closed")
        self.wait()
        path = self.root / f"ckpt_{iteration:07d}"
        job = {"iteration": iteration, "path": path, "capture_s": float(capture_s),
               "state": state, "error": None}
        self._job = job
        self._thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                        name=f"checkpoint-writer-{iteration}")
        self._thread.start()
        return path

    def _run(self, job: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            state = job["state"]
            if callable(state):
                try:
                    state = state()
                except CaptureLost as err:
                    job["lost"] = err
                    return
            job["collect_s"] = time.perf_counter() - t0
            write = self._write or ckpt.save_checkpoint
            path = write(self.root, job["iteration"], state, self.config, keep=self.keep)
            state = None
            job["write_s"] = time.perf_counter() - t0
            job["bytes"] = checkpoint_bytes(path)
            job["path"] = Path(path)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            job["error"] = err
        finally:
            job["state"] = None  # the memory goes as soon as the write ends

    def wait(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Waits for the write in flight, if any; returns its record.

        Raises:
            CheckpointError: The write failed (its path and error in the
                message), or did not end within ``timeout_s`` (default: the
                writer's); either way nothing is in flight afterwards.
        """
        thread, job = self._thread, self._job
        if thread is None or job is None:
            return None
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            thread.join(timeout)
        except KeyboardInterrupt:  # one more Ctrl-C while waiting: leave it unfinished
            self._thread = self._job = None
            print(f"\n{job['path']}: left unfinished (Ctrl-C during its write); "
                  f"{self._resume_point()}", flush=True)
            raise
        self._thread = self._job = None
        if thread.is_alive():
            raise ckpt.CheckpointError(
                f"{job['path']}: writing this checkpoint took over {timeout:g} s; given up "
                f"(a full or slow disk?): {self._resume_point()}")
        if job.get("lost") is not None:
            print(f"warning: {job['path'].name} not written: {job['lost']}; "
                  f"{self._resume_point()}", flush=True)
            return None
        err = job["error"]
        if err is not None:
            what = " ".join(str(err).split()) or type(err).__name__
            raise ckpt.CheckpointError(
                f"{job['path']}: writing this checkpoint failed ({type(err).__name__}: "
                f"{what}): {self._resume_point()}") from err
        record = {k: job[k] for k in ("iteration", "path", "capture_s", "collect_s", "write_s",
                                      "bytes")}
        self.records.append(record)
        return record

    def written(self, path: Path) -> bool:
        """Whether checkpoint ``path`` was written completely (after :meth:`wait`)."""
        return any(r["path"] == Path(path) for r in self.records)

    def _resume_point(self) -> str:
        done = self.last_iteration
        return ("no checkpoint of this run was written yet" if done is None else
                f"the checkpoint of iteration {done} stays the resume point")

    def close(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Waits for the write in flight (see :meth:`wait`); nothing more can be submitted."""
        self._closed = True
        return self.wait(timeout_s)
