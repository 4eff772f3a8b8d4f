"""Preemption-proof training: exact resume, atomic checkpoints, signals, refusal of bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distsent.checkpoint import COMPLETE_MARKER, complete_checkpoints
from distsent.preemption import EXIT_PREEMPTED
from tests.conftest import REPO, TINY, cli_env, launch, max_weight_difference, read_summary, run_cli

pytestmark = pytest.mark.slow

RUN = [*TINY, "train.max_steps=40", "checkpoint.every_steps=3"]


def train_losses(run: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def start(command: list[str]) -> subprocess.Popen:
    # A new session, so the whole launcher tree can be killed like a preempted job.
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and any(s >= step for s, _ in train_losses(run)):
            return
        if process.poll() is not None:
            pytest.fail(f"run ended (code {process.returncode}) before step {step}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout}s")


def distsent_command(processes: int, *args: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "distsent", *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/ddp.yaml"),
        "--num_processes",
        str(processes),
        "-m",
        "distsent",
        *args,
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("straight")
    runs = {1: root / "one", 2: root / "two"}
    run_cli("train", *RUN, "train.log_every_steps=1", f"output_dir={runs[1]}")
    launch("ddp.yaml", 2, "train", *RUN, "train.log_every_steps=1", f"output_dir={runs[2]}")
    return runs


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_after_step_17_then_resume_is_exact(straight, tmp_path, processes):
    run = tmp_path / "killed"
    args = ["train", *RUN, "train.log_every_steps=1", f"output_dir={run}"]
    process = start(distsent_command(processes, *args))
    wait_for_step(run, 17, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "final").exists(), "the run was meant to die before finishing"
    resumed = start(distsent_command(processes, *args, "train.resume=auto"))
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-4000:]
    assert "resumed from" in output
    # Same loss at every step (history rolled back to the checkpoint, then redone) ...
    assert train_losses(run) == train_losses(straight[processes])
    # ... and the same final weights.
    assert max_weight_difference(run / "final", straight[processes] / "final") == 0.0


def test_sigterm_to_one_rank_checkpoints_all_and_resumes(straight, tmp_path):
    run = tmp_path / "term"
    marker = tmp_path / "preempted.json"
    env = {**cli_env(), "DISTSENT_PREEMPTED_FILE": str(marker)}
    args = ["train", *RUN, "checkpoint.every_steps=100", "train.log_every_steps=1", f"output_dir={run}"]
    process = subprocess.Popen(
        distsent_command(2, *args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_step(run, 8, process)
    workers = [
        child.pid
        for child in psutil.Process(process.pid).children(recursive=True)
        if "distsent" in child.cmdline() and "accelerate.commands.launch" not in " ".join(child.cmdline())
    ]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGTERM)  # one rank only
    output = process.communicate(timeout=300)[0]
    # Each rank exits with EXIT_PREEMPTED; the launcher reports both and fails.
    assert output.count(f"exitcode  : {EXIT_PREEMPTED}") == 2, output[-4000:]
    assert json.loads(marker.read_text())["exit_code"] == EXIT_PREEMPTED
    checkpoints = complete_checkpoints(run)
    assert len(checkpoints) == 1 and 8 <= int(checkpoints[0].name.split("-")[1]) < 40
    assert not (run / "final").exists()
    launch("ddp.yaml", 2, *args, "train.resume=auto")
    assert max_weight_difference(run / "final", straight[2] / "final") == 0.0


def test_kill_during_checkpoint_write_leaves_a_usable_checkpoint(straight, tmp_path):
    run = tmp_path / "midwrite"
    args = [
        "train",
        *RUN,
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=3",
        "train.log_every_steps=1",
        f"output_dir={run}",
    ]
    process = start(distsent_command(1, *args))
    # Writing a checkpoint every step, the run is inside a write much of the time; kill as
    # soon as a partial folder exists beside at least one complete checkpoint.
    deadline = time.time() + 300
    while time.time() < deadline and not (complete_checkpoints(run) and any((run / "checkpoints").glob(".partial-*"))):
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert complete_checkpoints(run), "no complete checkpoint before the kill"
    # Also leave the other half-written shapes a crash can produce.
    newest = complete_checkpoints(run)[-1]
    unmarked = run / "checkpoints" / "step-00009999"
    shutil.copytree(newest, unmarked)
    (unmarked / COMPLETE_MARKER).unlink()
    result = run_cli(*args, "train.resume=auto")
    assert f"resumed from  {newest}" in result.stdout
    assert not list((run / "checkpoints").glob(".partial-*")) and not unmarked.exists()
    assert max_weight_difference(run / "final", straight[1] / "final") == 0.0


def test_keep_last_never_deletes_best(tmp_path):
    run = tmp_path / "keep"
    run_cli(
        "train",
        *TINY,
        "train.max_steps=12",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "train.eval_every_steps=2",
        "train.best_metric=loss",
        f"output_dir={run}",
    )
    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(run)]
    best_step = read_summary(run)["best_metric"]["step"]
    assert steps[-2:] == [8, 10]  # the last two before the end
    if best_step < 12:
        assert best_step in steps


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    run = tmp_path / "base"
    run_cli("train", *TINY, "train.max_steps=4", "checkpoint.every_steps=2", f"output_dir={run}")
    checkpoint = complete_checkpoints(run)[-1]

    foreign = run_cli(
        "train", *TINY, "train.max_steps=4", "train.batch_size=4", f"output_dir={run}", "train.resume=auto", check=False
    )
    assert foreign.returncode != 0
    assert "written by a different run" in foreign.stderr and "train.batch_size" in foreign.stderr

    state_file = checkpoint / "training_state.json"
    state_file.write_text("{not json")
    corrupt = run_cli(
        "train", *TINY, "train.max_steps=4", f"output_dir={run}", f"train.resume={checkpoint}", check=False
    )
    assert corrupt.returncode != 0 and "training_state.json" in corrupt.stderr


def test_pickled_objects_are_refused(tmp_path):
    import torch

    from distsent.checkpoint import CheckpointError, verify_no_arbitrary_pickles

    torch.save({"ok": torch.zeros(2)}, tmp_path / "fine.pt")
    verify_no_arbitrary_pickles(tmp_path)
    torch.save({"evil": subprocess.Popen}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        verify_no_arbitrary_pickles(tmp_path)


def test_exit_code_is_documented():
    assert str(EXIT_PREEMPTED) in (REPO / "README.md").read_text()


def test_preemption_during_validation_redoes_it_on_resume(tmp_path):
    # A long validation (all 853 examples, small batches) right after step 5, so the signal
    # lands inside it.
    args = [
        "train",
        *TINY,
        "data.max_eval_samples=853",
        "train.eval_batch_size=2",
        "train.max_steps=10",
        "train.eval_every_steps=5",
        "train.log_every_steps=5",
    ]
    straight = tmp_path / "straight"
    run_cli(*args, f"output_dir={straight}")
    run = tmp_path / "evalstop"
    process = start(distsent_command(1, *args, f"output_dir={run}"))
    wait_for_step(run, 5, process)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    state = json.loads((complete_checkpoints(run)[-1] / "training_state.json").read_text())["state"]
    assert state["global_step"] == 5 and state["eval_pending"] is True
    run_cli(*args, f"output_dir={run}", "train.resume=auto")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [5, 10]
    assert read_summary(run)["eval"]["accuracy"] == read_summary(straight)["eval"]["accuracy"]
    assert max_weight_difference(run / "final", straight / "final") == 0.0
