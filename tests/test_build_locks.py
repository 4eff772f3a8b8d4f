import os
import time

from distsent.build_locks import STALE_AFTER_S, stale_build_locks
from tests.conftest import run_cli


def make_lock(op_folder, age_s):
    lock = op_folder / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_only_locks_older_than_a_build_count_as_stale(tmp_path):
    # torch's default layout: <root>/<python and accelerator tag>/<op>/lock.
    old = make_lock(tmp_path / "py311_cpu" / "cpu_adam", STALE_AFTER_S + 60)
    make_lock(tmp_path / "py311_cpu" / "deepspeed_shm_comm", 5)  # a build under way right now
    (tmp_path / "py311_cpu" / "cpu_adam" / "build.ninja").touch()

    stale = stale_build_locks(tmp_path)
    assert [lock for lock, _ in stale] == [old]
    assert stale[0][1] > STALE_AFTER_S


def test_doctor_stops_a_deepspeed_launch_on_a_stale_lock(tmp_path):
    # Under TORCH_EXTENSIONS_DIR torch builds each op directly in <dir>/<op>.
    lock = make_lock(tmp_path / "cpu_adam", 3600)
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "ACCELERATE_USE_DEEPSPEED": "true"}
    result = run_cli("doctor", check=False, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"PROBLEM: {lock} is 60 min old" in result.stdout
    assert "delete the file" in result.stdout

    # Without DeepSpeed nothing builds ops, so the lock is reported but stops nothing.
    result = run_cli("doctor", env={"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert str(lock) in result.stdout and "PROBLEM" not in result.stdout
