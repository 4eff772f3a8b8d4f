"""One training run per output folder.

Two runs in one folder undo each other: the second takes the first's half-written
checkpoint for debris of a crash and removes it, moves its history aside, and replaces its
`best/`. A job submitted twice or a run started by hand beside a Slurm job does exactly
that. The main process holds an exclusive lock on a file in the folder while it trains; the
kernel releases it when the process ends, however it ends, so a killed run leaves no stale
lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

from distsent.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".distsent.lock"


def lock_output_dir(output_dir: Path) -> IO[str]:
    """Hold `output_dir` for this process; refuse when another run holds it. Keep the returned
    handle open for as long as the run uses the folder."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = (output_dir / LOCK_FILE).open("a+")
    except OSError as error:  # read-only file system, no permission: said before any work
        raise ConfigError(f"output_dir={output_dir}: cannot write there ({error.strerror})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"output_dir={output_dir}: another run is training there ({holder}); "
            "wait for it to end or choose another output_dir"
        ) from None
    except OSError as error:
        # Some cluster filesystems have no flock (Lustre mounted noflock: ENOSYS) or only a
        # node-local one. Training there is still right; only the guard is gone.
        log.warning(
            "output_dir=%s: cannot lock it (%s), so a second run started in this folder would not be "
            "refused; make sure only one run uses it",
            output_dir,
            error.strerror or error,
        )
    # Who holds it, for the message above; the lock itself is the flock, not this text.
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
