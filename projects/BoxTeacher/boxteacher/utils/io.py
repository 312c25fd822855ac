"""Files written atomically: a crash leaves the old file or the complete new one."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import IO, Any, Iterator

logger = logging.getLogger(__name__)

#: Suffix of the temporary file of an ``atomic_open`` write (``path + TEMPORARY_SUFFIX``).
TEMPORARY_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path + ".tmp"`` for writing; on success it replaces ``path`` atomically.

    The data is flushed and fsync-ed before ``os.replace``, so a crash leaves either the old
    file or the complete new one under ``path``, never a truncated file. On an exception the
    temporary file is removed and the exception propagates.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; got mode '{mode}'.")
    tmp_path = path + TEMPORARY_SUFFIX
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


def remove_stale_temporary_files(directory: str) -> list[str]:
    """Remove the ``*.tmp`` files that interrupted ``atomic_open`` writes left in ``directory``.

    Only the folder itself is cleaned, not its sub-folders: an output folder may be set to a
    folder that holds other things. Call it at the start of a run, on the main process only,
    before anything writes there. Returns the removed paths (each is logged).
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(TEMPORARY_SUFFIX) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
                removed.append(entry.path)
    for path in sorted(removed):
        logger.info("Removed %s, the temporary file of an interrupted write.", path)
    return sorted(removed)
