"""interrupts: a broken pipe, a signal swallowed by a finalizer, a DataLoader worker left behind by a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import commons

ROOT = Path(__file__).resolve().parent.parent


def test_pipe_safe_stream_survives_a_broken_pipe():
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = commons.pipe_safe(os.fdopen(write_end, "w"))
    assert stream.write("lost\n") == 5
    stream.flush()
    stream.write("still fine\n")
    assert stream.broken


class _SignalsItselfWhenCollected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # Python runs the handler here, inside __del__, which swallows what it raises
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_by_a_finalizer_stops_the_run_at_the_next_step():
    restore = commons.install_signal_handlers()
    try:
        commons.raise_if_interrupted()  # nothing received yet
        _SignalsItselfWhenCollected()  # collected at once: the Interrupted it raises is only printed
        with pytest.raises(commons.Interrupted) as error:
            commons.raise_if_interrupted()
        assert error.value.signum == signal.SIGTERM
    finally:
        restore()
    commons.raise_if_interrupted()  # restoring the handlers forgets the signal


# The main process signalled just after forking a DataLoader worker: the Interrupted leaves torch's iterator before
# it registers the worker, so nothing shuts that worker down. At exit multiprocessing sends it SIGTERM and waits.
_SIGNAL_WHILE_STARTING_A_WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import multiprocessing.process
from torch.utils.data import DataLoader
import commons
start = multiprocessing.process.BaseProcess.start
def start_then_signal(self):
    start(self)
    os.kill(os.getpid(), signal.SIGTERM)
multiprocessing.process.BaseProcess.start = start_then_signal
commons.install_signal_handlers()
try:
    for batch in DataLoader(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=commons.worker_init):
        pass
except commons.Interrupted as interrupted:
    sys.exit(128 + interrupted.signum)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_left_behind_by_a_signal_does_not_hang_the_exit():
    # a worker that ignored SIGTERM hung the exit for ever; one killed by it would be a "killed by signal" error
    script = _SIGNAL_WHILE_STARTING_A_WORKER.format(root=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 128 + signal.SIGTERM, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and "Exception ignored" not in completed.stderr, completed.stderr
