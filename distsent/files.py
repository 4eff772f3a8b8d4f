"""Files written whole: a kill, a full disk or a machine that dies leaves the old file or the
new one, never a cut-off file that a later read (`distsent report`, a resume) chokes on."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_whole(path: Path, text: str) -> None:
    """`text` as UTF-8 (whatever the locale) into `path`: written beside it under a name of its
    own, flushed, and renamed onto it. Through a symlink the file it names is replaced; a path
    that is no regular file (/dev/null, a pipe) is written into as it is, since renaming onto
    it would replace the device."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not target.is_file():
        with target.open("w", encoding="utf-8") as handle:
            handle.write(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name per write: two processes writing one path (two evaluations of one held-out file)
    # must not share, and truncate, one staging file.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with staging.open("x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            shutil.copymode(target, staging)  # a replaced file keeps its permissions
        staging.replace(target)
        fsync_path(target.parent)
    finally:
        staging.unlink(missing_ok=True)
