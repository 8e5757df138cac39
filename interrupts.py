"""SIGTERM and SIGHUP handled like Ctrl-C, and console streams that survive a reader that goes away.

Kept free of heavy imports so that every script (synthetic.py too) can use it; `commons` re-exports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

__all__ = ["Interrupted", "install_signal_handlers", "pipe_safe"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into a KeyboardInterrupt, so that they clean up as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"received {self.signal_name}")


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


class _PipeSafeStream:
    """A console stream (stdout, stderr) that survives a reader that stops reading (`| head`, quitting `less`).

    On the first broken pipe its file descriptor is pointed at /dev/null, so that later writes, flushes (tqdm's,
    the interpreter's at exit) and child processes sharing the descriptor all succeed and the run goes on, still
    logging to its files.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def _on_broken_pipe(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._on_broken_pipe()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._on_broken_pipe()
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()  # the buffered text now goes to /dev/null

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def pipe_safe(stream: TextIO | None) -> TextIO | None:
    """`stream` wrapped so that a broken pipe never raises (see `_PipeSafeStream`); wrapping twice is a no-op."""
    return stream if isinstance(stream, _PipeSafeStream) or stream is None else _PipeSafeStream(stream)


def install_signal_handlers() -> Callable[[], None]:
    """Make SIGTERM (timeout, SLURM, docker stop) and SIGHUP (a closed terminal) raise `Interrupted`, a
    KeyboardInterrupt, so that they clean up exactly as Ctrl-C does; make stdout/stderr survive a broken pipe.

    Also ignores SIGPIPE (as Python does at start-up, in case a parent process changed that) so that a reader
    that goes away gives BrokenPipeError, which `pipe_safe` streams absorb. Returns a function that restores the
    previous handlers and streams. Outside the main thread (where Python cannot set handlers) only the streams are
    changed.
    """
    previous_streams = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = pipe_safe(sys.stdout), pipe_safe(sys.stderr)
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name, handler in (("SIGTERM", _raise_interrupted), ("SIGHUP", _raise_interrupted), ("SIGPIPE", None)):
            signum = getattr(signal, name, None)  # Windows has no SIGHUP nor SIGPIPE
            if signum is not None:
                previous_handlers[signum] = signal.signal(signum, signal.SIG_IGN if handler is None else handler)

    def restore() -> None:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        sys.stdout, sys.stderr = previous_streams

    return restore
