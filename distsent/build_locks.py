"""Stale build locks: the DeepSpeed start-up hang that prints nothing.

On a machine without prebuilt ops, DeepSpeed compiles its CPU ops (cpu_adam, shm_comm)
on first use through torch.utils.cpp_extension. That serialises builds of an op with a
`lock` file in the op's build folder and waits, without limit and without a message, while
the file exists. A build killed half-way (a preempted job, a timeout, a restarted machine)
leaves the file behind, and every later run on that machine hangs at start-up. Builds here
take about a minute, so a lock much older than that is almost certainly such a leftover.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# A lock older than this is reported as stale: a real build takes 30-80 s on 2 cores.
STALE_AFTER_S = 300


def extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def stale_build_locks(root: Path | None = None, older_than_s: float = STALE_AFTER_S) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) for each op build lock older than `older_than_s`."""
    root = extensions_root() if root is None else root
    now = time.time()
    stale = []
    # torch builds an op in <TORCH_EXTENSIONS_DIR>/<op>, or by default in
    # ~/.cache/torch_extensions/<python and accelerator tag>/<op>.
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build that held it just finished
            continue
        if age > older_than_s:
            stale.append((lock, age))
    return stale


def describe_stale_lock(lock: Path, age_s: float) -> str:
    return (
        f"{lock} is {age_s / 60:.0f} min old; torch waits on it without limit before building the "
        f"'{lock.parent.name}' op, so DeepSpeed will hang at start-up. Unless a build of that op is "
        "running right now, a killed build left it: delete the file"
    )
