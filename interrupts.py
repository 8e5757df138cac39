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

__all__ = ["Interrupted", "install_signal_handlers", "pipe_safe", "raise_if_interrupted", "worker_init"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into a KeyboardInterrupt, so that they clean up as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"received {self.signal_name}")


_received: int | None = None  # the signal that `install_signal_handlers` turned into `Interrupted`, if any


def _raise_interrupted(signum: int, frame: object) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise `Interrupted` again if a SIGTERM or SIGHUP has been received since `install_signal_handlers`.

    The handler raises where the main thread happens to be, and Python swallows an exception raised inside a
    `__del__` method or a weakref callback (e.g. a DataLoader iterator shutting its workers down) with an
    "Exception ignored" message, so the run would go on. Long loops call this at each step so that such a signal
    still stops the run, at the next step.
    """
    if _received is not None:
        raise Interrupted(_received)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)


def worker_init(worker_id: int) -> None:
    """`worker_init_fn` of DataLoaders: a worker leaves quietly (exit code 0) on SIGTERM or SIGHUP.

    A worker gets the signal with the main process when a process group is signalled (`timeout`, SLURM, a closed
    terminal); the main process stops the run. The default action, death by signal, would turn that clean stop
    into a "DataLoader worker ... killed by signal" error; ignoring the signal instead would leave a worker that
    the main process failed to register (signalled while starting it) immune to the SIGTERM with which
    multiprocessing ends daemonic children at exit, and the exit would then wait for it forever.
    """
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_quietly)


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
    global _received
    _received = None
    previous_streams = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = pipe_safe(sys.stdout), pipe_safe(sys.stderr)
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for name, handler in (("SIGTERM", _raise_interrupted), ("SIGHUP", _raise_interrupted), ("SIGPIPE", None)):
            signum = getattr(signal, name, None)  # Windows has no SIGHUP nor SIGPIPE
            if signum is not None:
                previous_handlers[signum] = signal.signal(signum, signal.SIG_IGN if handler is None else handler)

    def restore() -> None:
        global _received
        _received = None
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        sys.stdout, sys.stderr = previous_streams

    return restore
