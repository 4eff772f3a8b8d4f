"""A preemption warning that arrives while `distsent train` is still starting.

Slurm warns a job with SIGUSR1 (`--signal=USR1@90`) whenever its time runs short, which
may be seconds after a requeued segment starts. Before train() installs its
PreemptionWatcher, a second or more of imports and set-up, SIGUSR1's default action
killed the process (exit 138) without the marker that makes the job script requeue it.
`distsent train` catches SIGUSR1 first thing instead; the watcher takes over what was
caught and stops after the first optimizer step, with a checkpoint.

Only SIGUSR1: torchrun and srun end the surviving ranks of a failed launch with SIGTERM,
and a rank that caught that while starting would wait in a collective for peers that are
gone, where dying at once was right.
"""

from __future__ import annotations

import os
import signal

EARLY_SIGNALS = ("SIGUSR1",)
_caught: list[str] = []


def catch_early_signals() -> None:
    """Record EARLY_SIGNALS from now on, until `take_early_signals`."""
    for name in EARLY_SIGNALS:
        signal.signal(getattr(signal, name), _record)


def _record(number: int, frame) -> None:
    _caught.append(signal.Signals(number).name)


def is_early_catch(handler) -> bool:
    """Whether `handler` is the early catch's (a handler never to go back to)."""
    return handler is _record


def take_early_signals(watched: list[str]) -> str | None:
    """Hand the early signals over to a watcher of `watched`, once its own handlers are in:
    returns the first one caught that it watches (it stops the run as its own would), or None.
    A caught signal it does not watch gets its default action now, as it would have had
    without the early catch; so does any later one."""
    caught = list(_caught)
    _caught.clear()
    for name in EARLY_SIGNALS:
        number = getattr(signal, name)
        if name not in watched and is_early_catch(signal.getsignal(number)):
            signal.signal(number, signal.SIG_DFL)
    for name in caught:
        if name not in watched:
            os.kill(os.getpid(), getattr(signal, name))
    return next((name for name in caught if name in watched), None)
