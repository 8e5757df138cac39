"""commons: run folders (plain names only, their own folder per run, errors that name the folder) and process seeds."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from helpers import BAD_EXP_NAMES

import commons


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from datetime import datetime

    frozen = datetime(2024, 2, 29, 12, 0, 0)
    monkeypatch.setattr(commons, "datetime", types.SimpleNamespace(now=lambda: frozen))
    folders = [commons.make_run_folder("same", root=tmp_path) for _ in range(3)]
    assert [f.name for f in folders] == ["2024-02-29_12-00-00", "2024-02-29_12-00-00_1", "2024-02-29_12-00-00_2"]


def test_concurrent_runs_never_share_a_folder(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    frozen = datetime(2024, 2, 29, 12, 0, 0)
    monkeypatch.setattr(commons, "datetime", types.SimpleNamespace(now=lambda: frozen))
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: commons.make_run_folder("same", root=tmp_path), range(16)))
    assert len(set(folders)) == 16 and all(f.is_dir() for f in folders)


def test_process_seed_wraps_into_numpys_range():
    assert [commons.process_seed(2**32 - 2, rank) for rank in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
    commons.make_deterministic(commons.process_seed(2**32 - 1, 3))  # numpy accepts it


@pytest.mark.parametrize("name", BAD_EXP_NAMES)
def test_make_run_folder_refuses_paths(name, tmp_path):
    import commons

    root = tmp_path / "logs"
    root.mkdir()
    with pytest.raises(ValueError, match="give one folder name"):
        commons.make_run_folder(name, root)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs"]


def test_make_run_folder_keeps_plain_names(tmp_path):
    import commons

    for name in ("default", "run with spaces", "été-2026", "..dots.."):
        folder = commons.make_run_folder(name, tmp_path)
        assert folder.parent == tmp_path / name and folder.is_dir()


@pytest.mark.parametrize("existing", [[], ["logs"]])
def test_run_folder_not_writable_names_the_folder(existing, tmp_path, monkeypatch):
    """A read-only logs/ (simulated: the tests may run as root, who can write anywhere) names the folder that
    refused, in one line."""
    import errno

    import commons

    for name in existing:
        (tmp_path / name).mkdir()
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.parent.name in ("", "logs", tmp_path.name) and self.parent.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(PermissionError) as error:
        commons.make_run_folder("default", tmp_path / "logs")
    blocked = tmp_path / "logs" if existing else tmp_path
    assert str(error.value).startswith(f"cannot create the run folder {tmp_path / 'logs' / 'default'}/")
    assert str(error.value).endswith(f"Permission denied; check that {blocked} is writable")
