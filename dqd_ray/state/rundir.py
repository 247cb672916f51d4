"""The run directory's small durable files and its lock.

- :func:`atomic_write_text`: a temporary file, fsync, replace, fsync of the
  directory: a crash leaves the old file or the new one, never half of one;
- :func:`read_jsonl`, the one reader of ``metrics.jsonl`` (a torn last line,
  left by a crash in the middle of a write, is dropped with a warning);
- :class:`RunLock`, which keeps a second process out of a run directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
import weakref
from pathlib import Path

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
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    warnings.warn(f"{self.path}: this filesystem cannot lock files ({err}): "
                                  "nothing keeps a second process out of this run directory",
                                  UserWarning, stacklevel=3)
                else:
                    holder = f.read()
                    f.close()
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise RunDirInUse(
                            f"{self.path.parent} is in use by {self._describe(holder)}: a run "
                            "directory takes one `run` or `resume` at a time (wait for it to "
                            "end or stop it)") from None
                    raise RunDirInUse(f"{self.path}: cannot lock the run directory "
                                      f"({err})") from err
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
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]])
                    if sys.argv and sys.argv[0] else "python"}  # no arguments: they may be secret
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
