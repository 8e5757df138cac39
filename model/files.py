"""Files written atomically: a temporary file beside the target, renamed over it when complete, so that a crash,
an interruption or a full disk never leaves a partial file; and the clean-up of the temporary files of killed
writers. Checkpoints, training records, predictions and pictures are all written this way."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["process_is_alive", "replaced_atomically", "remove_stale_temporaries", "save_atomically"]

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # .<name>.<pid>.<random>.tmp


def process_is_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts), on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of `replaced_atomically` in `folder` whose process no longer exists (killed by
    SIGKILL or the out-of-memory killer in the middle of a write); returns them. Live writers' files are left."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = _TEMPORARY.match(entry.name)
            if match and int(match.group(1)) != os.getpid() and not process_is_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _tensor_bytes(obj: object) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): about the size `torch.save` writes."""
    if isinstance(obj, Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_error(path: Path, temporary: Path, error: BaseException, needed: int | None) -> OSError | None:
    """A one-line OSError naming `path`, the bytes and what to do when writing it failed for want of space or by
    the file-size limit (RLIMIT_FSIZE, `ulimit -f`); None when `error` is something else. torch.save reports both as
    a RuntimeError without errno, so the disk and the limit are checked after the fact."""
    written = temporary.stat().st_size if temporary.exists() else 0
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    number = getattr(error, "errno", None)
    size = f"{needed} bytes to write" if needed else "its bytes"
    if number == errno.EFBIG or (
        limit != resource.RLIM_INFINITY and (written >= limit or (needed is not None and needed >= limit))
    ):
        reason = f"the file-size limit of this process is {limit} bytes (ulimit -f)"
        advice = "raise the limit (ulimit -f unlimited) and run again"
    elif number in (errno.ENOSPC, errno.EDQUOT) or (free is not None and needed is not None and free < needed):
        reason = f"no space left on the device ({free} bytes free in {path.parent}"
        reason += ", or a disk quota)" if number == errno.EDQUOT else ")"
        advice = "free some space there, or write elsewhere (--exp_name, another working folder), and run again"
    elif isinstance(error, RuntimeError) and re.search(r"unexpected pos|file write failed", str(error)):
        # torch's writer lost bytes for a reason it does not say: a disk quota, a network file system, a full disk
        # that freed up since
        reason = f"the write failed ({str(error).strip().splitlines()[0]})"
        advice = (
            f"check the free space ({free} bytes), the disk quota (quota -s) and the file-size limit (ulimit -f) "
            f"of {path.parent}, and run again"
        )
    else:
        return None
    clear = OSError(
        f"cannot write {path}: {reason}, {size}, {written} written when it failed; {advice}. The previous "
        f"{path.name}, if any, is unchanged and no temporary file is left"
    )
    clear.errno = number or errno.ENOSPC
    return clear


@contextlib.contextmanager
def replaced_atomically(path: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """A temporary file next to `path` to write; when the block ends normally it replaces `path` (a rename), and on
    any exception it is removed: a crash or an interruption never leaves a partial `path` nor the temporary file.

    The temporary file (a hidden name with the process id and a random part, so concurrent writers never share one)
    is created empty with mode 0o666 minus the umask (not mkstemp's 0o600), so the result has the permissions any new
    file would get. Temporary files of processes that no longer exist (killed by SIGKILL mid-write) in the same folder
    are removed first. A full disk or the file-size limit raises an OSError that names `path` and the bytes
    (`expected_bytes`, when the caller knows them).
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    while True:
        temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        clear = _write_error(path, temporary, error, expected_bytes) if isinstance(error, Exception) else None
        temporary.unlink(missing_ok=True)
        if clear is not None:
            raise clear from error
        raise


def save_atomically(obj: object, path: str | Path) -> None:
    """`torch.save(obj)` to `path` through `replaced_atomically` (creating its folder if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, _tensor_bytes(obj)) as temporary:
        torch.save(obj, temporary)
