"""model.files: atomic writes that keep the previous file, the umask's permissions, file-size limits and full disks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import commons
import util
from model import HomographyRegression, files
from model.checkpoints import save_state_dict
from model.files import replaced_atomically

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_state_dict(HomographyRegression(resize=(32, 32)), tmp_path / "hr.torch")
        util.save_results(tmp_path / "results.json", [1], [50.0], None)
    finally:
        os.umask(previous)
    assert (tmp_path / "hr.torch").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_interrupted_midway_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("complete\n")
    with pytest.raises(commons.Interrupted), replaced_atomically(path) as temporary:
        temporary.write_text("half")
        raise commons.Interrupted(signal.SIGTERM)
    assert path.read_text() == "complete\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_the_file_size_limit_while_saving_is_one_line_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "homography_regression_000.torch"
    files.save_atomically({"small": torch.zeros(10)}, path)
    before = path.read_bytes()
    script = f"""
        import resource, torch
        from model.files import save_atomically
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, resource.RLIM_INFINITY))
        try:
            save_atomically({{"big": torch.zeros(100000)}}, {str(path)!r})
        except OSError as error:
            print(error)
    """
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr  # not killed by SIGXFSZ
    assert f"cannot write {path}: the file-size limit of this process is 100000 bytes (ulimit -f)" in completed.stdout
    assert "400000 bytes to write" in completed.stdout and "raise the limit" in completed.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last_checkpoint.pth"
    script = f"""
        import os, signal
        from model.files import replaced_atomically
        with replaced_atomically({str(path)!r}) as temporary:
            temporary.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=environment, timeout=120)
    assert completed.returncode == -signal.SIGKILL
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1  # what SIGKILL leaves
    files.save_atomically({"weights": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_write_that_torch_reports_without_a_reason_is_one_line_that_says_what_to_check(tmp_path, monkeypatch):
    path = tmp_path / "last_checkpoint.pth"

    def quota_exceeded(obj, temporary):  # a disk quota: plenty of free space, and torch says only this
        Path(temporary).write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(files.torch, "save", quota_exceeded)
    with pytest.raises(OSError, match=r"cannot write .*last_checkpoint.pth: the write failed \(\[enforce fail"):
        files.save_atomically({"weights": torch.zeros(3)}, path)
    assert list(tmp_path.iterdir()) == []
