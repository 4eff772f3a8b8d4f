"""A SIGUSR1 (Slurm's time warning) while `distsent train` is still starting is not lost: the
run stops after its first step with a checkpoint and the preempted exit code, as it would later."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distsent import early_signals
from distsent.checkpoint import STEP_PREFIX, complete_checkpoints
from distsent.early_signals import catch_early_signals
from distsent.preemption import EXIT_PREEMPTED, PreemptionWatcher
from tests.conftest import REPO, TINY, cli_env

USR1_BIT = 1 << (signal.SIGUSR1 - 1)


@pytest.fixture
def own_handlers():
    """The test process's SIGUSR1 and SIGTERM handlers, and no caught signal, afterwards."""
    before = {number: signal.getsignal(number) for number in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for number, handler in before.items():
        signal.signal(number, handler)
    early_signals._caught.clear()


def test_a_caught_signal_is_handed_to_the_watcher_which_stops_on_it(own_handlers):
    catch_early_signals()
    signal.raise_signal(signal.SIGUSR1)
    watcher = PreemptionWatcher(["SIGUSR1", "SIGTERM"])
    assert watcher.requested and watcher.received == "SIGUSR1"
    watcher.restore()
    # Stopping: the watched signals are ignored until the process exits.
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN


def test_without_an_early_signal_the_watcher_gives_back_the_default_not_the_early_catch(own_handlers):
    catch_early_signals()
    watcher = PreemptionWatcher(["SIGUSR1"])
    assert not watcher.requested
    watcher.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_caught_signal_the_run_does_not_watch_acts_as_it_would_have():
    # checkpoint.signals without SIGUSR1: its default action (termination), now.
    code = (
        "import os, signal\n"
        "from distsent.early_signals import catch_early_signals\n"
        "from distsent.preemption import PreemptionWatcher\n"
        "catch_early_signals()\n"
        "signal.raise_signal(signal.SIGUSR1)\n"
        "PreemptionWatcher(['SIGTERM'])\n"
        "print('survived')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGUSR1 and "survived" not in result.stdout, result.stderr


def catches_usr1(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16) & USR1_BIT)


@pytest.mark.slow
def test_a_warning_during_start_up_stops_the_run_after_its_first_step(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "preempted.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "distsent", "train", *TINY, "train.max_steps=20", f"output_dir={out}"],
        cwd=REPO,
        env={**cli_env(), "DISTSENT_PREEMPTED_FILE": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not catches_usr1(process.pid):
        assert process.poll() is None and time.time() < deadline, "SIGUSR1 was never caught"
        time.sleep(0.002)
    # Caught from before torch is imported: train() and its watcher come seconds later. Without
    # the early catch, SIGUSR1 is first caught by the watcher, and the run does not say this.
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "SIGUSR1 came while distsent train was starting" in output, output[-3000:]
    assert "stopped at step 1 on SIGUSR1" in output
    assert json.loads(marker.read_text())["made_progress"] is True
    assert [int(path.name.removeprefix(STEP_PREFIX)) for path in complete_checkpoints(out)] == [1]
