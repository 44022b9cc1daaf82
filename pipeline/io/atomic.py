"""Writing files so that a crash, a full disk or a watching reader never sees half of one."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"
# A full disk, or a full quota: the same advice (free space, write elsewhere) for the user.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """No space left while writing ``path``; the previous file at ``path``, if any, is intact."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.ENOSPC, f"disk full while writing {path}")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.args[1])


def temporary_name(path: Path, keep_suffix: bool = False) -> Path:
    """A hidden name beside ``path``, unique per process and call. ``keep_suffix`` ends it with the
    target's suffix (``.nii.gz`` counts as one) for writers that choose the format by file name."""
    suffix = ""
    if keep_suffix:
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}{suffix}")


def stale_temporaries(folder: str | Path, name: str) -> list[Path]:
    """Temporary files of ``name`` left in ``folder`` by a process killed while writing it."""
    return sorted(Path(folder).glob(f".{name}.*{TMP_SUFFIX}*"))


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for any writer to fill; when the block succeeds, fsync
    it and rename it over ``path`` (atomic on POSIX), then fsync the folder so the rename itself is
    durable. On failure the temporary file is removed and any previous ``path`` is left as it was;
    a full disk raises ``DiskFullError`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(path) from error
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``atomic_path`` with the temporary file opened for binary writing."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:  # "x": the umask's permissions, unlike mkstemp
        yield handle
        handle.flush()


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain: libraries (torch's zip writer, gzip) often wrap the OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        if "No space left on device" in str(error):  # torch's C++ writer keeps only the message
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
