import subprocess
import sys

from tests.conftest import REPO

PROGRAM = """
import atexit, pathlib, sys
from distsent.worker_exit import exit_without_teardown
atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text("exit handlers ran"))
print("buffered output", end="")
exit_without_teardown(75)
print("never printed")
"""


def test_a_worker_exits_with_its_code_after_the_exit_handlers(tmp_path):
    marker = tmp_path / "marker"
    # stdout is a pipe here, so "buffered output" sits in Python's buffer until flushed.
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(marker)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 75, result.stderr
    assert result.stdout == "buffered output"
    assert marker.read_text() == "exit handlers ran"
