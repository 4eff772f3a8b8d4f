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

from distsent import checkpoint
from distsent.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    complete_checkpoints,
    replace_directory,
    rollback_history,
    tidy_interrupted_exports,
    tidy_interrupted_writes,
)
from distsent.preemption import EXIT_PREEMPTED
from tests.conftest import (
    REPO,
    TINY,
    accelerate_launch_command,
    cli_env,
    kill_process_tree,
    launch,
    max_weight_difference,
    read_summary,
    run_cli,
    write_labeled_csv,
)

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


def distsent_command(processes: int, *args: str, launch_file: str = "ddp.yaml") -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "distsent", *args]
    return [*accelerate_launch_command(launch_file, processes), "-m", "distsent", *args]


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


@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_sigkill_then_resume_is_exact(tmp_path, stage):
    """DeepSpeed's own checkpoint (each rank's optimizer partition, ZeRO-3's partitioned
    weights) restores the run exactly: same losses, same final weights. With offload the
    optimizer that steps is DeepSpeed's CPU Adam, which a resume gives new parameter
    groups: the schedule must follow them (it once kept a resumed run at one rate)."""
    args = ["train", *TINY, "train.max_steps=12", "checkpoint.every_steps=4", "train.log_every_steps=1"]
    straight_run, run = tmp_path / "straight", tmp_path / "killed"
    launch(f"{stage}.yaml", 2, *args, f"output_dir={straight_run}")
    command = distsent_command(2, *args, f"output_dir={run}", launch_file=f"{stage}.yaml")
    process = start(command)
    wait_for_step(run, 9, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "final").exists(), "the run was meant to die before finishing"
    assert [c.name for c in complete_checkpoints(run)][-1] == "step-00000008"
    resumed = start([*command, "train.resume=auto"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-4000:]
    assert "step-00000008 (step 8)" in output
    assert train_losses(run) == train_losses(straight_run)
    assert max_weight_difference(run / "final", straight_run / "final") == 0.0


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
    # A partial folder that has its marker missed only its rename: the next start completes it.
    finished = [
        run / "checkpoints" / path.name.removeprefix(".partial-")
        for path in (run / "checkpoints").glob(".partial-*")
        if (path / COMPLETE_MARKER).is_file()
    ]
    newest = max([*complete_checkpoints(run), *finished], key=lambda path: path.name)
    # Also leave the other half-written shapes a crash can produce.
    unmarked = run / "checkpoints" / "step-00009999"
    shutil.copytree(complete_checkpoints(run)[-1], unmarked)
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
    # Checkpoints at steps 2 and 4 (the last step is exported, not checkpointed).
    run_cli("train", *TINY, "train.max_steps=6", "checkpoint.every_steps=2", f"output_dir={run}")
    checkpoint = complete_checkpoints(run)[-1]

    foreign = run_cli(
        "train", *TINY, "train.max_steps=6", "train.batch_size=4", f"output_dir={run}", "train.resume=auto", check=False
    )
    assert foreign.returncode != 0
    assert "written by a different run" in foreign.stderr and "train.batch_size" in foreign.stderr
    assert "to continue it" not in foreign.stderr  # another run: no launch continues it

    export = run_cli(
        "train", *TINY, "train.max_steps=6", f"output_dir={run}", f"train.resume={run / 'final'}", check=False
    )
    assert export.returncode == 2 and "not a distsent checkpoint (no training_state.json)" in export.stderr

    state_file = checkpoint / "training_state.json"
    state = state_file.read_text()
    state_file.write_text("{not json")
    corrupt = run_cli(
        "train", *TINY, "train.max_steps=6", f"output_dir={run}", f"train.resume={checkpoint}", check=False
    )
    assert corrupt.returncode != 0 and "training_state.json" in corrupt.stderr

    # Without its random state a resume draws other masks and data: not exact, so refused
    # (accelerate alone skips an unreadable one with an INFO line).
    state_file.write_text(state)
    (checkpoint / "random_states_0.pkl").write_bytes(b"\x80\x04trunc")
    truncated = run_cli(
        "train", *TINY, "train.max_steps=6", f"output_dir={run}", f"train.resume={checkpoint}", check=False
    )
    assert truncated.returncode == 2, truncated.stderr[-3000:]
    assert "random_states_0.pkl: this rank's random state cannot be read" in truncated.stderr
    # The message names the checkpoint before the damaged one as the way on.
    earlier = complete_checkpoints(run)[-2]
    assert f"train.resume={earlier} resumes from the checkpoint before it" in truncated.stderr


def older_checkpoint(tmp_path: Path, missing_key: str, *settings: str) -> tuple[list[str], Path, Path]:
    """A 6-step run (the uninterrupted result copied to straight_final) whose first checkpoint's
    fingerprint lacks `missing_key`, as an older distsent wrote it: (train args, run, checkpoint)."""
    run = tmp_path / "older"
    args = ["train", *TINY, "train.max_steps=6", "checkpoint.every_steps=2", f"output_dir={run}"]
    run_cli(*args, *settings)
    shutil.copytree(run / "final", tmp_path / "straight_final")
    first = complete_checkpoints(run)[0]
    state_file = first / "training_state.json"
    payload = json.loads(state_file.read_text())
    del payload["fingerprint"][missing_key]
    state_file.write_text(json.dumps(payload))
    return args, run, first


def test_a_checkpoint_from_before_the_layout_was_recorded_still_resumes(tmp_path):
    packing = "train.unpad_min_padding=0.0"  # every micro-batch with padding is packed
    args, run, first = older_checkpoint(tmp_path, "checkpoint_layout", packing)
    straight = read_summary(run)
    resumed = run_cli(*args, packing, f"train.resume={first}")
    assert "(step 2)" in resumed.stdout + resumed.stderr
    assert max_weight_difference(run / "final", tmp_path / "straight_final") == 0.0
    # The summary's counts are the whole run's, the steps before the resume included.
    assert straight["packed_micro_batches"] > 0
    for key in ("packed_micro_batches", "train_tokens"):
        assert read_summary(run)[key] == straight[key], key


def test_a_checkpoint_from_before_a_setting_existed_names_the_value_that_continues_it(tmp_path):
    # Before model.train_only_seen_embeddings, every embedding row was trained: as with false.
    key = "model.train_only_seen_embeddings"
    args, run, first = older_checkpoint(tmp_path, key, f"{key}=false")

    refused = run_cli(*args, f"train.resume={first}", check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{key}: checkpoint False (written before the setting existed), this run True" in refused.stderr
    assert f"set {key}=false to continue it" in refused.stderr
    assert max_weight_difference(run / "final", tmp_path / "straight_final") == 0.0  # nothing lost

    resumed = run_cli(*args, f"train.resume={first}", f"{key}=false")
    assert "(step 2)" in resumed.stdout + resumed.stderr
    assert max_weight_difference(run / "final", tmp_path / "straight_final") == 0.0


def test_pickled_objects_are_refused(tmp_path):
    import torch

    from distsent.checkpoint import verify_no_arbitrary_pickles

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


def test_resuming_after_an_early_stop_trains_no_further(tmp_path):
    # The stop at step 4 is checkpointed; a requeued job must not take a step 5.
    run = tmp_path / "stopped"
    args = [
        "train",
        *TINY,
        "train.max_steps=20",
        "train.eval_every_steps=4",
        "checkpoint.every_steps=4",
        "train.early_stopping_target=0.0",
        f"output_dir={run}",
    ]
    run_cli(*args)
    first = read_summary(run)
    assert first["global_step"] == 4 and first["stopped_early"]
    # Steps 1-4 never completed a logging window (every 5 steps); their tokens still count.
    assert first["train_tokens"] > 0 and first["train_tokens_per_second"] > 0
    shutil.copytree(run / "final", tmp_path / "first_final")
    result = run_cli(*args, "train.resume=auto")
    assert "resumed from" in result.stdout
    assert read_summary(run)["global_step"] == 4
    assert max_weight_difference(run / "final", tmp_path / "first_final") == 0.0


def test_a_fresh_run_moves_the_earlier_run_aside_and_resumes_only_itself(tmp_path):
    run = tmp_path / "reused"
    earlier = ["train", *TINY, "train.max_steps=6", "checkpoint.every_steps=3", f"output_dir={run}"]
    run_cli(*earlier)
    later = ["train", *TINY, "train.max_steps=6", "checkpoint.every_steps=2", "train.lr=1e-4", f"output_dir={run}"]
    (run / "wandb" / "offline-run-earlier").mkdir(parents=True)  # as an earlier run with W&B leaves it
    moving = run_cli(*later).stderr
    # Said once, naming what moved.
    assert moving.count("moved the earlier run's files") == 1 and "checkpoints.before-" in moving
    # The later run's pruning kept its own checkpoints and left the earlier run's alone.
    assert [c.name for c in complete_checkpoints(run)] == ["step-00000002", "step-00000004"]
    (moved,) = run.glob("checkpoints.before-*")
    assert [p.name for p in moved.iterdir()] == ["step-00000003"]
    assert len(list(run.glob("metrics.before-*.jsonl"))) == 1
    # Its plots, summary and predictions went with it: the ones in place are the later run's.
    for name in ("plots.before-*", "summary.before-*.json", "validation_predictions.before-*.json", "wandb.before-*"):
        assert len(list(run.glob(name))) == 1, name
    # So did its exports: a later run that dies after its first validation cannot have
    # replaced the earlier best/ for good.
    for name in ("best.before-*", "final.before-*"):
        (archived,) = run.glob(name)
        assert (archived / "model.safetensors").is_file()
    # All under one stamp, so an earlier run's files can be told from another's.
    stamps = {path.name.split(".before-")[1].split(".")[0] for path in run.glob("*.before-*")}
    assert len(stamps) == 1, sorted(path.name for path in run.glob("*.before-*"))
    assert "step-00000004" in run_cli(*later, "train.resume=auto").stdout
    # The earlier run's settings do not continue the later run: its lr differs.
    refused = run_cli(*earlier, "train.resume=auto", check=False)
    assert refused.returncode == 2 and "train.lr: checkpoint 0.0001, this run 5e-05" in refused.stderr


def test_a_second_run_in_a_busy_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    """Two runs in one folder undo each other (the second took the first's half-written
    checkpoint for crash debris and replaced its best/); a job submitted twice does that."""
    run = tmp_path / "busy"
    first = subprocess.Popen(
        distsent_command(1, "train", *TINY, "train.max_steps=100000", "train.log_every_steps=1", f"output_dir={run}"),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_step(run, 3, first)
        second = run_cli("train", *TINY, "train.max_steps=2", f"output_dir={run}", check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"output_dir={run}: another run is training there (pid {first.pid} on" in second.stderr
        assert not list(run.glob("*.before-*")), "the refused run moved the running one's files"
        assert first.poll() is None, "the refused run stopped the running one"
    finally:
        kill_process_tree(first)
    # The kernel drops a killed holder's lock: its lock file stays, and the folder is free again.
    run_cli("train", *TINY, "train.max_steps=2", f"output_dir={run}")


def test_a_filesystem_without_flock_gets_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    """Lustre mounted `noflock` answers flock with ENOSYS: the run goes on, unguarded, and says so."""
    import errno
    import fcntl

    from distsent.run_lock import lock_output_dir

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    handle = lock_output_dir(tmp_path / "run")
    handle.close()
    assert "cannot lock it (Function not implemented)" in caplog.text
    assert "make sure only one run uses it" in caplog.text


def test_changed_data_or_precision_is_refused_on_resume(tmp_path):
    run = tmp_path / "data"
    base = ["train", *TINY, "train.max_steps=4", "checkpoint.every_steps=2", f"output_dir={run}"]
    run_cli(*base)
    # One example fewer shifts every later batch: not a continuation of the same run.
    refused = run_cli(*base, "data.validation_fraction=0.11", "train.resume=auto", check=False)
    assert refused.returncode == 2 and "train_set" in refused.stderr and "data.validation_fraction" in refused.stderr
    # Another validation set would be compared with the best metric of the first.
    refused = run_cli(*base, "data.max_eval_samples=50", "train.resume=auto", check=False)
    assert refused.returncode == 2 and "validation_set" in refused.stderr and "train_set" not in refused.stderr
    # Two digests name no setting: the message says what makes them differ.
    assert "the tokenised validation texts or labels differ" in refused.stderr
    assert "data.max_eval_samples" in refused.stderr
    # The precision is compared as resolved, so `auto` cannot switch it between machines.
    refused = run_cli(*base, "train.mixed_precision=bf16", "train.resume=auto", check=False)
    assert refused.returncode == 2
    assert "precision: checkpoint 'no', this run 'bf16'" in refused.stderr
    assert "set train.mixed_precision=no to continue it" in refused.stderr


def test_interrupted_checkpoint_writes_are_finished_or_undone(tmp_path):
    root = tmp_path / "checkpoints"

    def folder(name: str, marked: bool) -> None:
        path = root / name
        path.mkdir(parents=True)
        (path / "weights").write_text(name)
        if marked:
            (path / COMPLETE_MARKER).write_text("1\n")

    folder(".partial-step-00000005", marked=True)  # killed between its marker and its rename
    folder(".step-00000006.old-1a2b3c4d", marked=True)  # killed after retiring step 6, before the new one moved in
    folder(".partial-step-00000007", marked=False)  # killed mid-write
    folder("step-00000008", marked=False)
    folder("step-00000009", marked=True)
    folder(".step-00000009.old-5e6f7a8b", marked=True)  # killed before the replaced copy was deleted
    done = tidy_interrupted_writes(tmp_path)
    assert len(done) == 5
    names = ["step-00000005", "step-00000006", "step-00000009"]
    assert [c.name for c in complete_checkpoints(tmp_path)] == names
    assert sorted(p.name for p in root.iterdir()) == names
    assert (root / "step-00000009" / "weights").read_text() == "step-00000009"


def test_interrupted_exports_are_undone(tmp_path):
    for name in (".best.tmp-1a2b3c4d", "best", ".best.old-5e6f7a8b", ".final.old-9c0d1e2f"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text(name)
    done = tidy_interrupted_exports(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "best"
    assert (tmp_path / "final" / "model.safetensors").read_text() == ".final.old-9c0d1e2f"


def test_published_folders_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """Each file and folder is fsynced before the rename that makes it a checkpoint or export,
    and the parent after it, so a machine crash cannot leave a whole-looking empty folder."""
    staging, target = tmp_path / ".partial-step-00000003", tmp_path / "step-00000003"
    (staging / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "sub/optimizer.bin", COMPLETE_MARKER):
        (staging / name).write_text(name)
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    synced = []
    real_fsync = checkpoint.fsync_path

    def recording_fsync(path: Path) -> None:
        real_fsync(path)
        synced.append((path, (target / "sub").exists()))  # (what, whether the new folder is published yet)

    monkeypatch.setattr(checkpoint, "fsync_path", recording_fsync)
    expected = {staging / "model.safetensors", staging / "sub" / "optimizer.bin", staging / COMPLETE_MARKER}
    replace_directory(staging, target)
    before_publishing = {path for path, published in synced if not published}
    assert expected | {staging / "sub", staging} <= before_publishing
    assert synced[-1] == (tmp_path, True)  # then the renames themselves
    assert (target / "sub" / "optimizer.bin").read_text() == "sub/optimizer.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_a_torn_last_history_line_is_dropped_on_resume(tmp_path):
    events = [json.dumps({"event": "train", "step": step, "loss": 0.5}) for step in (5, 10, 15)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(events) + '\n{"event": "eval", "st')
    assert rollback_history(tmp_path, 10) == 2
    assert metrics.read_text().splitlines() == events[:2]
    metrics.write_text(events[0] + "\n{broken\n" + events[1] + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: not a JSON object"):
        rollback_history(tmp_path, 10)


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """A write the OS refuses (here a file-size limit, as a full disk or quota would): one
    line and a non-zero exit, the earlier run's export kept, no half-written copy left."""
    import resource

    run = tmp_path / "full"
    run_cli("train", *TINY, "train.max_steps=2", f"output_dir={run}")
    before = (run / "best" / "model.safetensors").read_bytes()

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    result = subprocess.run(
        [sys.executable, "-m", "distsent", "train", *TINY, "train.max_steps=2", f"output_dir={run}"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "distsent: disk error:" in result.stderr and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    (kept,) = run.glob("best.before-*")
    assert (kept / "model.safetensors").read_bytes() == before
    assert not list(run.glob(".*.tmp-*")), "a half-written export was left behind"


def test_a_test_score_is_reported_only_for_the_test_split_best_was_scored_on(tmp_path):
    """The test score is taken when best/ is chosen and kept in checkpoints; a resume given
    another test file must not report the old file's score as this one's."""
    import random

    from distsent.config import load_config
    from distsent.data import load_labeled_splits

    splits = load_labeled_splits(load_config(None, ["data.test_fraction=0.1"]).data)
    rows = {split: list(zip(splits.texts[split], splits.labels[split], strict=True)) for split in splits.texts}
    for split in rows:
        random.Random(0).shuffle(rows[split])  # the embedded file is sorted by label
    files = {}
    for name, split, start, count in [
        ("train", "train", 0, 256),
        ("val", "validation", 0, 50),
        ("test", "test", 0, 100),
        ("other_test", "test", 100, 100),
    ]:
        chosen = [(text, splits.label_names[label]) for text, label in rows[split][start:][:count]]
        files[name] = write_labeled_csv(tmp_path / f"{name}.csv", chosen)
    run = tmp_path / "run"
    args = [
        "train",
        "model.name=tiny-bert",
        "train.batch_size=8",
        "train.mixed_precision=no",
        "data.dataset=files",
        f"data.train_file={files['train']}",
        f"data.validation_file={files['val']}",
        "train.lr=1e-3",  # validation accuracy peaks at step 2 of 8 here
        "train.eval_every_steps=2",
        "train.max_steps=8",
        "checkpoint.every_steps=2",
        f"output_dir={run}",
    ]
    run_cli(*args, f"data.test_file={files['test']}")
    first = read_summary(run)
    assert first["best_metric"]["step"] == 2 and first["test"]["model_step"] == 2
    resume = f"train.resume={run / 'checkpoints' / 'step-00000004'}"
    other = run_cli(*args, f"data.test_file={files['other_test']}", resume)
    assert "no test score: best/ (step 2) was chosen before this test split was given" in other.stderr
    assert read_summary(run)["best_metric"]["step"] == 2 and "test" not in read_summary(run)
    # The same test file again: the score kept in the checkpoint is reported.
    run_cli(*args, f"data.test_file={files['test']}", resume)
    assert read_summary(run)["test"] == first["test"]
    # Resumed into another folder: best/ comes along, so the score has its model beside it.
    elsewhere = [*args[:-1], f"data.test_file={files['test']}", resume]
    moved = tmp_path / "moved"
    result = run_cli(*elsewhere, f"output_dir={moved}")
    assert f"copied {run / 'best'} (step 2) to {moved / 'best'}" in result.stderr
    assert (moved / "best" / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()
    assert read_summary(moved)["test"] == first["test"]
    # Where that best/ is gone, the run says so instead of pointing at a folder that is not there.
    shutil.rmtree(run / "best")
    gone = run_cli(*elsewhere, f"output_dir={tmp_path / 'gone'}")
    assert "best/ of step 2, which this checkpoint records as its best, is not in" in gone.stderr
