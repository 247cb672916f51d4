"""Metric sinks: progress bar, metrics.jsonl, wandb (offline without a key).

Also the run directory's small durable files: :func:`atomic_write_text`
(a temporary file, fsync, replace, fsync of the directory),
:func:`read_jsonl`, the one reader of ``metrics.jsonl`` (a torn last line,
left by a crash in the middle of a write, is dropped with a warning), and
:class:`RunLock`, which keeps a second process out of a run directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dqd_ray.config import ConfigError


class MetricsFileError(ConfigError):
    """A metrics file with a corrupt line that is not its last."""


def fsync_dir(path: str | Path) -> None:
    """Makes the entries of directory ``path`` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replaces ``path`` with ``text`` so that a crash leaves either the old
    file or the new one, never a partial one: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace`` and an fsync of the
    directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_durably(path: str | Path, text: str) -> None:
    """Appends ``text`` to ``path`` and fsyncs it (and the directory when the
    file is new)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(path.parent)


def parse_jsonl(path: str | Path) -> tuple[list[tuple[str, dict]], str | None]:
    """The ``(line, object)`` pairs of a JSON-lines file and its torn last line
    (``None`` if none).

    A last line that does not parse is what a crash in the middle of a write
    leaves (the file is appended to, one line per iteration): it is returned
    apart, not parsed. Any other line that does not parse is an error.

    Raises:
        MetricsFileError: A corrupt line that is not the last, naming the file
            and the line number.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    numbered = [(n, ln) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
    rows, torn = [], None
    for k, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        except ValueError as err:
            problem = str(err)
        if problem is not None:
            if k == len(numbered) - 1:
                torn = line
                break
            raise MetricsFileError(
                f"{path}, line {n}: not a JSON object ({problem}); only a torn last line (a "
                "crash while it was written) is dropped by itself: repair or delete this line")
        rows.append((line, row))
    return rows, torn


def torn_warning(path: str | Path, torn: str) -> None:
    warnings.warn(f"{path}: dropped its torn last line ({len(torn)} characters that do not "
                  "parse, left by a crash while it was written)", UserWarning, stacklevel=3)


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file (``metrics.jsonl``); a torn last line
    is dropped with a warning, any other corrupt line raises
    :class:`MetricsFileError`."""
    rows, torn = parse_jsonl(path)
    if torn is not None:
        torn_warning(path, torn)
    return [row for _, row in rows]


class RunDirInUse(ConfigError):
    """Another process holds the run directory's lock."""


class RunLock:
    """``RUN_DIR/.lock``: one process at a time writes a run directory.

    An exclusive ``flock`` on the open lock file, held until :meth:`release`
    (the end of :meth:`Experiment.run`, or when its :class:`Experiment` is
    dropped unrun); the kernel drops it when the process dies, however it
    dies. The file holds the holder's pid, host and start time, for the
    message that refuses a second process. A lock file that is there but not
    locked was left by a process that died: it is taken over with a warning.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self._f = None
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._f is not None

    @staticmethod
    def _describe(text: str) -> str:
        try:
            info = json.loads(text)
            return (f"pid {info['pid']} on host {info['host']} (since {info['started']}, "
                    f"{info.get('command', '?')})")
        except (ValueError, KeyError, TypeError):
            return f"an unknown process ({text.strip()[:80]!r})" if text.strip() else \
                "a process that has not written its pid yet"

    def acquire(self) -> RunLock:
        """Takes the lock (a no-op when already held).

        Raises:
            RunDirInUse: Another process (or another :class:`Experiment` of
                this one) holds it; the message names its pid and host.
        """
        if self._f is not None:
            return self
        for _ in range(20):  # a holder may remove the file between our open and our flock
            f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = f.read()
                f.close()
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirInUse(
                        f"{self.path.parent} is in use by {self._describe(holder)}: a run "
                        "directory takes one `run` or `resume` at a time (wait for it to end "
                        "or stop it)") from None
                raise RunDirInUse(f"{self.path}: cannot lock the run directory ({err})") from err
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                continue
            previous = f.read()
            if previous.strip():
                warnings.warn(f"{self.path}: taking over the lock left by "
                              f"{self._describe(previous)}: that process ended without "
                              "releasing it (a crash or a kill)", UserWarning, stacklevel=3)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join(sys.argv)[:200]}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self._f = f
            self._finalizer = weakref.finalize(self, RunLock._release, f, self.path)
            return self
        raise RunDirInUse(f"{self.path}: could not take the lock (the file keeps changing)")

    @staticmethod
    def _release(f, path: Path) -> None:
        try:  # removed first, unlocked then: a waiter that opened it retries on the new file
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                path.unlink()
        except (FileNotFoundError, ValueError, OSError):
            pass
        f.close()

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _release once
        self._f = self._finalizer = None



def _clean(v: Any):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class Sink:
    """A metric sink: ``log(metrics, archive=None, checkpoint=None)`` once per
    iteration (``checkpoint``: the directory saved at this iteration, if any),
    ``close()`` at the end. ``wants_archive`` says when ``log`` should get the
    archive."""

    def wants_archive(self, iteration: int) -> bool:
        return False


class JsonlSink(Sink):
    """``metrics.jsonl``: each line is flushed and fsynced as it is written,
    before the loop writes that iteration's checkpoint (:attr:`before_checkpoint`),
    so that no checkpoint is ever ahead of the metrics."""

    before_checkpoint = True

    def __init__(self, path: Path):
        self.path = Path(path)
        new = not self.path.exists()
        self.f = open(path, "a", buffering=1)
        if new:
            fsync_dir(self.path.parent)

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        self.f.write(json.dumps(_clean(metrics)) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class ProgressSink(Sink):
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="it",
                        dynamic_ncols=True)

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        best = metrics.get("best_fitness")
        self.bar.set_postfix(qd=f"{metrics['qd_score']:.0f}", cov=f"{100 * metrics['coverage']:.1f}%",
                             best="-" if best is None else f"{best:.1f}",
                             sps=f"{metrics.get('env_steps_per_s', 0):.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def wandb_mode() -> str:
    """``online`` only with an API key (or an explicit WANDB_MODE); never prompts."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def scalars(metrics: dict) -> dict:
    """The finite int/float entries of ``metrics`` (what dashboards and Tune take)."""
    return {k: v for k, v in _clean(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink(Sink):
    """One wandb run per experiment; heatmaps every ``heatmap_every`` iterations.

    Args:
        run_dir: The wandb files go to ``run_dir/wandb``.
        cfg: The run's config (logged as the wandb config).
        run_id: The wandb run id (a resumed run continues the same wandb run).
        dims, names: Archive shape and measure names, for the heatmap.
        resume: Continue an existing wandb run of that id if there is one.
        name, group: Display name (default: the run directory's name) and
            group (default: ``logging.wandb_group``); a Tune trial passes its
            trial name and its sweep's name.
        extra_config: Merged into the logged config (a trial's sampled values).
    """

    def __init__(self, run_dir: Path, cfg, run_id: str, dims, names, resume: bool = False,
                 ranges=None,
                 name: str | None = None, group: str | None = None,
                 extra_config: dict | None = None):
        import wandb

        self.wandb = wandb
        self.dims, self.names, self.every = dims, names, cfg.logging.heatmap_every
        self.ranges = ranges if ranges is not None else cfg.env.resolved_ranges()
        config = cfg.model_dump(mode="json")
        if extra_config:
            config = {**config, **extra_config}
        self.run = wandb.init(
            project=cfg.logging.wandb_project, group=group or cfg.logging.wandb_group,
            config=config, dir=str(run_dir), id=run_id,
            name=name or run_dir.name, mode=wandb_mode(), resume="allow" if resume else None,
            # Written to the run's .wandb file every second, not every 15 s: a
            # Tune trial stopped early (ASHA, PBT) may end before its wandb
            # run finishes, and keeps what was flushed.
            settings=wandb.Settings(silent=True, console="off",
                                    finish_timeout=cfg.logging.wandb_finish_timeout_s,
                                    x_transaction_log_flush_interval=1.0),
        )
        self.run_dir = Path(self.run.dir).parent if self.run is not None else None

    def wants_archive(self, iteration: int) -> bool:
        return iteration % self.every == 0 or iteration == 1

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        data = scalars(metrics)
        it = int(metrics["iteration"])
        if archive is not None and self.wants_archive(it):
            from dqd_ray.viz import heatmap

            fig = heatmap(archive, self.dims, names=self.names, ranges=self.ranges,
                          title=f"iteration {it}")
            data["archive"] = self.wandb.Image(fig)
            import matplotlib.pyplot as plt

            plt.close(fig)
        self.run.log(data, step=it, commit=True)

    def log_media(self, media: dict, iteration: int) -> None:
        """The end-of-run heatmap and best-elite GIF.

        wandb ignores a step below its current one, and ``log`` has already
        committed the last iteration's step (its current step is one past
        it); a resumed run's current step is wherever that run stopped. The
        media go to the final iteration's step when it is still open (a
        resumed run that ran no iteration here), else to the first step
        wandb accepts, the one right after the last iteration's.
        """
        data = {}
        if "archive" in media:
            data["final_archive"] = self.wandb.Image(media["archive"])
        if "best_elite" in media:
            data["best_elite"] = self.wandb.Video(media["best_elite"], format="gif")
        if data:
            self.run.log(data, step=max(int(iteration), int(self.run.step)), commit=True)

    def close(self) -> None:
        self.run.finish()
