"""Preemption: turn SIGUSR1/SIGTERM into a flag every rank agrees on at a step boundary.

A signal handler only sets a flag; the loop asks `should_stop()` at optimizer-step
boundaries (and between evaluation batches). The flag is all-reduced, so if any rank was
signalled, every rank stops at the same step, writes its part of one checkpoint and exits
with EXIT_PREEMPTED. Slurm scripts requeue the job on that code.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import torch

from distsent.early_signals import is_early_catch, take_early_signals

log = logging.getLogger("distsent")

# EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted run means.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised inside the loop once all ranks agreed to stop; carries the exit code."""

    exit_code = EXIT_PREEMPTED


def record_preemption(reason: str, made_progress: bool) -> None:
    """Write "this run was preempted" where a job script asked (DISTSENT_PREEMPTED_FILE).

    Launchers such as `accelerate launch` report a failed worker with their own exit code
    (1), so a script cannot rely on seeing EXIT_PREEMPTED; the marker file carries it.
    Called by the main process as soon as the checkpoint is written, before the run tears
    down: in a multi-node job srun may kill this process once another node's ranks exit.

    `made_progress` says whether this segment got anywhere (see `segment_made_progress`):
    a job script must not requeue a segment that did not, or it would loop forever."""
    if not made_progress:
        log.error(
            "this segment was stopped before it finished an optimizer step or a pending validation: "
            "its checkpoint is the one it resumed from, so a requeued job of the same length would "
            "stop at the same point. Give the job more time, or a larger train.eval_batch_size (a "
            "resume may change it; a smaller data.max_eval_samples changes the validation set, "
            "which only a new run may do)"
        )
    marker = os.environ.get("DISTSENT_PREEMPTED_FILE")
    if marker:
        record = {"exit_code": EXIT_PREEMPTED, "reason": reason, "made_progress": made_progress}
        Path(marker).write_text(json.dumps(record) + "\n")


def segment_made_progress(at_start: tuple[int, bool], now: tuple[int, bool]) -> bool:
    """Whether a segment moved on from where it started, given (optimizer step, validation
    pending) at its start and at its stop: an optimizer step, or a pending validation finished.
    A validation cut off by a preemption is redone from its beginning on resume, so starting
    one is no progress."""
    (start_step, start_pending), (step, pending) = at_start, now
    return step > start_step or (start_pending and not pending)


class PreemptionWatcher:
    """Installs handlers for `signal_names` and answers, collectively, whether to stop."""

    def __init__(self, signal_names: list[str]) -> None:
        self.requested = False
        self.received: str | None = None
        self._previous = {}
        for name in signal_names:
            number = getattr(signal, name)
            previous = signal.signal(number, self._on_signal)
            # Not back to the early catch's handler at the end: to what it stood in for.
            self._previous[number] = signal.SIG_DFL if is_early_catch(previous) else previous
        # A signal caught while `distsent train` was starting stops the run at the first step.
        early = take_early_signals(signal_names)
        if early is not None:
            self.requested, self.received = True, early
            log.warning("%s came while distsent train was starting: the run stops at its first step boundary", early)

    def _on_signal(self, number: int, frame) -> None:
        # Only set a flag: a handler runs between bytecodes, possibly mid-collective.
        self.requested = True
        self.received = signal.Signals(number).name

    def should_stop(self, accelerator) -> bool:
        """True on every rank if any rank was signalled. Collective: all ranks must call it."""
        if accelerator.num_processes == 1:
            # Nothing to agree on, so nothing to read from the device: on a GPU that read
            # would wait for the step just queued, and the host could never queue ahead.
            return self.requested
        flag = accelerator.reduce(torch.tensor(1.0 if self.requested else 0.0, device=accelerator.device), "sum")
        # .item() is a host-device sync; once per optimizer step is cheap next to the step.
        stop = flag.item() > 0
        if stop and not self.requested:
            self.received = "peer rank"
        self.requested = self.requested or stop
        return stop

    def restore(self) -> None:
        """Put the previous handlers back, unless this run is stopping on preemption.

        When one rank exits with EXIT_PREEMPTED first, torchrun (and srun) SIGTERM the other
        ranks. Those have written their checkpoint part and are only tearing down; dying on
        that SIGTERM would turn a clean, requeueable exit into a kill. So a stopping process
        ignores the signals it watched until it exits (SIGKILL still works).
        """
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_IGN if self.requested else handler)
