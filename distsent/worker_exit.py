"""How a distributed worker process ends: without interpreter teardown.

A CI run of the test suite saw two finished 2-process runs (one DDP, one ZeRO-3 offload)
fail because rank 1 died with SIGABRT ("terminate called without an active exception")
after its work was done: rank 0 had printed the summary, rank 1 had nothing left but to
exit. The launcher then reports the whole finished run as failed, and a Slurm script would
requeue it. 50 more launches, alone and under CPU contention, did not repeat it, so this
is a rare race in interpreter teardown, where the C++ parts of gloo and DeepSpeed are
destroyed in whatever order finalisation reaches them (the DeepSpeed engine is still
referenced at that point, and torch has discussed the same SIGABRT for gloo work objects
destroyed during finalisation). A worker therefore leaves with os._exit once its work is
on disk: there is nothing left that teardown would do for it.

train() leaves the process group up, and this exit skips its teardown too. train() used to
destroy it while the DDP model lived on in a raised error; freeing the model then freed
gloo's group from the DDP Reducer, which joins gloo's worker thread holding the GIL while
that thread waits for the GIL to free the last collective's tensors. 1 in 6 two-process
launches that refused a resume hung that way.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
from typing import NoReturn


def report_fatal_signals() -> None:
    """Print every thread's Python stack if the process dies of SIGSEGV, SIGABRT and the like,
    so a crash in a worker names where it happened instead of only its signal."""
    faulthandler.enable()


def process_group_is_up() -> bool:
    """Whether this process joined a torch.distributed group (train() leaves it up)."""
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def exit_without_teardown(code: int) -> NoReturn:
    """Run the exit handlers (logging, W&B, tqdm), flush stdio, and end the process with `code`.

    Only for a process's own command line: it never returns to a caller."""
    # The handlers flush and close what libraries registered (logging.shutdown among them)
    # while the interpreter is still whole; files distsent writes are closed already.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
