"""Safe writing of the dataset tools' output folders (`synthetic.py`, `make_vg_dataset.py`).

A tool writes its dataset into a temporary sibling folder ``.<name>.partial-<pid>`` and renames it to ``<name>`` at
the end, so an error or a signal leaves nothing half-written. Before the rename it writes a marker file,
``MARKER``, that names the tool, its settings and every file it wrote. ``--overwrite`` replaces only a folder that
such a marker recognises as the same tool's dataset with nothing else in it: never a folder of the user's, the
folder of the input photos or CSV, a dataset of the other tool, nor a file. Folders written before the marker
existed are refused too, with a message that says how to delete them by hand.

Kept free of heavy imports, as `interrupts`, so that `synthetic.py` stays light.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from model.files import process_is_alive

MARKER = ".dataset_tool.json"
_LISTED_EXTRAS = 3  # foreign files named in a refusal


def write_marker(staging: Path, tool: str, settings: dict | None = None) -> None:
    """Write ``staging / MARKER``: the tool, its settings and the files (relative paths) now under ``staging``."""
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    marker = {"tool": tool, "settings": settings or {}, "files": files}
    (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` (see `write_marker`), or None when it has none or an unreadable one."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("tool"), str):
        return None
    if not isinstance(marker.get("files"), list) or not all(isinstance(name, str) for name in marker["files"]):
        return None
    return marker


def _foreign_entries(folder: Path, listed: set[str]) -> list[str]:
    """Paths under ``folder`` (relative) that are not files listed in its marker nor folders holding them."""
    parents = {parent for name in listed for parent in Path(name).parents if str(parent) != "."}
    parents = {parent.as_posix() for parent in parents}
    foreign = []
    for root, dirs, files in os.walk(folder):
        for entry in sorted(dirs) + sorted(files):
            path = Path(root) / entry
            relative = path.relative_to(folder).as_posix()
            if relative == MARKER and path.is_file() and not path.is_symlink():
                continue
            expected = parents if entry in dirs and not path.is_symlink() else listed
            if path.is_symlink() or relative not in expected:
                foreign.append(relative)
        dirs[:] = [entry for entry in dirs if not (Path(root) / entry).is_symlink()]
    return foreign


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(folder: Path, tool: str, protected: Sequence[Path] = ()) -> None:
    """Raise FileExistsError, saying what is there, unless ``folder`` is a dataset that ``tool`` wrote (its marker
    says so) with nothing else in it, holding none of the ``protected`` paths (the tool's inputs)."""
    folder = Path(folder)
    refusal = f"{folder} is not replaced by --overwrite: "
    if folder.is_symlink():
        raise FileExistsError(refusal + f"it is a symbolic link (to {os.readlink(folder)}); remove or rename it")
    if not folder.is_dir():
        raise FileExistsError(refusal + "it is a file, not a dataset folder; move it away or pick another --name")
    resolved = folder.resolve()
    for path in protected:
        path = Path(path).resolve()
        if path == resolved or resolved in path.parents:
            raise FileExistsError(refusal + f"it holds the input {path}; pick another --out or --name")
    marker = read_marker(folder)
    if marker is None:
        raise FileExistsError(
            refusal + f"it has no {MARKER}, so it is not recognisably a dataset written by {tool} (datasets "
            f"written before that marker existed have none); if it holds nothing you need, delete it by hand "
            f"(rm -r {folder}) and run again"
        )
    if marker["tool"] != tool:
        raise FileExistsError(refusal + f"it is a dataset written by {marker['tool']}, not by {tool}")
    foreign = _foreign_entries(folder, set(marker["files"]))
    if foreign:
        shown = ", ".join(foreign[:_LISTED_EXTRAS])
        if len(foreign) > _LISTED_EXTRAS:
            shown += f" and {len(foreign) - _LISTED_EXTRAS} more"
        raise FileExistsError(refusal + f"it holds files that {tool} did not write ({shown}); move them away first")


def check_destination(final: Path, tool: str, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Raise FileExistsError when the tool may not write ``final``: it exists, is not an empty folder, and either
    ``overwrite`` is off or `check_replaceable` refuses it."""
    final = Path(final)
    if not (final.exists() or final.is_symlink()) or _is_empty_folder(final):
        return
    check_replaceable(final, tool, protected)
    if not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass --overwrite to replace it")


def staging_folder(out_dir: Path, name: str) -> Path:
    """This run's temporary folder for ``out_dir / name``."""
    return Path(out_dir) / f".{name}.partial-{os.getpid()}"


def handle_leftovers(out_dir: Path, name: str, overwrite: bool) -> None:
    """Deal with the temporary folders of other runs on ``name``: a live run's is a conflict (FileExistsError, even
    with ``overwrite``), a dead run's (killed, e.g. with SIGKILL, before it could clean up) is removed, or, for the
    old dataset of a run killed in the middle of its swap, renamed back to ``name``."""
    out_dir = Path(out_dir)
    pattern = glob.escape(f".{name}")
    leftovers = sorted(out_dir.glob(f"{pattern}.partial-*")) + sorted(out_dir.glob(f"{pattern}.old-*"))
    for leftover in leftovers:
        pid_text = leftover.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            continue  # not a name this module writes: leave it alone
        pid = int(pid_text)
        if pid != os.getpid() and process_is_alive(pid):
            if ".old-" in leftover.name:
                continue  # that run is swapping its dataset in
            raise FileExistsError(  # even with --overwrite: both runs would report a dataset, one of them deleted
                f"another run (process {pid}) is writing {out_dir / name} right now ({leftover}); wait for it, then "
                f"pass --overwrite to replace its result, or pick another --name (if no such run is going, delete "
                f"{leftover})"
            )
        final = out_dir / name
        if ".old-" in leftover.name and not (final.exists() or final.is_symlink()):
            # killed between the two renames of an --overwrite: the old dataset is the only one, put it back
            logging.getLogger(__name__).warning(f"Restoring {final} from {leftover}, left by an interrupted run")
            leftover.rename(final)
            continue
        logging.getLogger(__name__).warning(f"Removing {leftover}, left behind by an interrupted run")
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def publish(staging: Path, final: Path, tool: str, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Rename the finished ``staging`` folder to ``final``.

    An empty ``final`` is filled atomically; one that another run filled meanwhile raises FileExistsError. With
    ``overwrite``, a ``final`` that `check_replaceable` accepts (checked again now) is swapped out and removed only
    once the new one is in place.
    """
    staging, final = Path(staging), Path(final)
    if overwrite and (final.exists() or final.is_symlink()) and not _is_empty_folder(final):
        check_replaceable(final, tool, protected)
        retired = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired)
        return
    try:  # atomic: fills an empty folder, fails on one that another run filled meanwhile
        staging.rename(final)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(f"{final} was written by another run meanwhile; pass --overwrite to replace it") from None
