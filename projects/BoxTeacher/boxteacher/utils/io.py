"""Files written atomically: a crash leaves the old file or the complete new one."""
from __future__ import annotations

import contextlib
import os
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path + ".tmp"`` for writing; on success it replaces ``path`` atomically.

    The data is flushed and fsync-ed before ``os.replace``, so a crash leaves either the old
    file or the complete new one under ``path``, never a truncated file. On an exception the
    temporary file is removed and the exception propagates.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; got mode '{mode}'.")
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (POSIX); not possible on every platform or file system."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
