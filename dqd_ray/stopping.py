"""How a run stops: stop signals turned into a request checked between
iterations (:class:`GracefulStop`), and the error a failed run raises
(:class:`RunFailed`). Used by the driver loop (:mod:`dqd_ray.loop`)."""

from __future__ import annotations

import os
import signal
import threading


class RunFailed(RuntimeError):
    """A run stopped by a failure (a role's error, a missed deadline); the
    message names the cause and the checkpoint to resume from."""


def _cause(err: BaseException) -> BaseException:
    """The error a role raised, unwrapped from Ray's task errors."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if isinstance(inner, BaseException):
            err = inner
        else:
            break
    return err


class GracefulStop:
    """Turns SIGINT/SIGTERM into a stop request checked between iterations.

    The first signal only sets :attr:`requested` (nothing is interrupted, so
    no role is left half-way through an iteration); the second raises
    ``KeyboardInterrupt`` for an immediate stop. Handlers are installed only
    in the main thread (elsewhere, e.g. inside a Tune trial, the caller stops
    the loop) and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second stop signal ({name})")
        self.requested = name
        msg = (f"\n{name}: stopping after the running iteration completes and checkpointing "
               "it; send it again to stop at once (the unfinished iteration is then lost)\n")
        try:
            print(msg, end="", flush=True)
        except RuntimeError:  # the signal came in the middle of another print
            os.write(2, msg.encode())
