"""The suite's subprocess helper: a hung launcher must not leave workers behind."""

from __future__ import annotations

import sys

import psutil
import pytest

from tests.conftest import run_captured

# Starts a "worker" in a session of its own, as torch elastic does, prints its pid, then hangs.
HANGING_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
print(worker.pid, flush=True)
time.sleep(120)
"""


def test_a_command_past_its_timeout_is_killed_with_its_workers():
    with pytest.raises(pytest.fail.Exception, match="ran past 3 s; killed with its children") as failure:
        run_captured([sys.executable, "-c", HANGING_LAUNCHER], timeout=3)
    printed = str(failure.value).split("killed with its children\n", 1)[1]
    worker_pid = int(printed.split()[0])
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE


def test_a_finished_command_returns_its_code_and_output():
    result = run_captured([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (result.returncode, result.stdout) == (3, "out\n")
