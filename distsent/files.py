"""Files written whole: a kill, a full disk or a machine that dies leaves the old file or the
new one, never a cut-off file that a later read (`distsent report`, a resume) chokes on."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

# What a killed write leaves beside its file or folder; `tidy_staged_files` removes files.
STAGING_INFIX = ".tmp-"


def staging_sibling(target: Path) -> Path:
    """A hidden sibling of `target` to write into before renaming onto it: a name per call, so
    two writers of one path (two evaluations of one held-out file) never share one."""
    return target.with_name(f".{target.name}{STAGING_INFIX}{uuid.uuid4().hex[:8]}")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some filesystems (FUSE mounts among them) cannot flush a folder; the rename is done.
        if not (path.is_dir() and error.errno in (errno.EINVAL, errno.EBADF)):
            raise
    finally:
        os.close(descriptor)


def staged_destination(path: Path) -> Path | None:
    """The regular file that `write_whole(path)` replaces (a symlink's target), or None where it
    writes into `path` as it is: a device, a pipe or a file a process holds open (/dev/null,
    /dev/stdout, /proc/self/fd/N). Renaming onto those would replace the device, or the file
    the shell opened for `>>` with only this text."""
    path = Path(path)
    if str(path.absolute()).startswith(("/dev/", "/proc/")) or (path.exists() and not path.is_file()):
        return None
    return Path(os.path.realpath(path))  # never raises on a symlink loop, unlike Path.resolve


def write_whole(path: Path, text: str) -> None:
    """`text` as UTF-8 (whatever the locale) into `path`: written beside it under a name of its
    own, flushed, and renamed onto it; see `staged_destination` for what is written in place."""
    target = staged_destination(path)
    if target is None:
        # Appended: reopening /dev/stdout with "w" truncates the file a shell's `>>` opened.
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.write(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_sibling(target)
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


def tidy_staged_files(folder: Path) -> list[str]:
    """Remove the staging files killed writes left in `folder`; returns what was done."""
    done = []
    for staging in sorted(Path(folder).glob(f".*{STAGING_INFIX}*")):
        if staging.is_file():
            staging.unlink()
            done.append(f"removed {staging}, left by an interrupted write")
    return done
