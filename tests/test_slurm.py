"""The shipped sbatch scripts on a real (one-node, CPU) Slurm cluster started by the tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from distsent.checkpoint import complete_checkpoints
from tests.conftest import REPO, max_weight_difference, read_summary
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow

CONFIG = REPO / "tests" / "configs" / "tiny_slurm.yaml"
# This cluster has CPUs only: no GPUs to ask for, one CPU per job so two jobs run side by side.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=00:20:00"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(
    cluster: SlurmCluster,
    script: str,
    output_dir: Path,
    log: Path,
    sbatch_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    overrides: tuple[str, ...] = (),
) -> int:
    env = {"DISTSENT_PYTHON": sys.executable, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return cluster.sbatch(
        *CPU_NODE,
        *sbatch_args,
        f"--output={log}",
        str(REPO / "launch" / "slurm" / script),
        str(CONFIG),
        f"output_dir={output_dir}",
        *overrides,
        cwd=REPO,
        env=env,
    )


def test_single_node_sbatch_completes_with_an_export(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(cluster, "single_node.sbatch", out, log)
    state, exit_code, _ = cluster.wait(job)
    assert (state, exit_code) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    assert read_summary(out)["global_step"] == 120
    AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert f"job {job} (restart 0)" in log.read_text()


def test_multi_node_sbatch_starts_the_ranks_asked_for(cluster, tmp_path):
    """The multi-node script on the one node there is, with two ranks (DDP over gloo): its
    srun/accelerate arithmetic, not only the single-node script's."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = submit(
        cluster,
        "multi_node.sbatch",
        out,
        log,
        sbatch_args=("--nodes=1", "--cpus-per-task=2"),
        env={"DISTSENT_PROCESSES_PER_NODE": "2"},
    )
    state, exit_code, _ = cluster.wait(job)
    assert (state, exit_code) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    assert f"job {job} (restart 0) on 1 node(s) x 2 process(es)" in log.read_text()
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["global_step"] == 120


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory) -> Path:
    """An uninterrupted job, the reference for the interrupted ones."""
    root = tmp_path_factory.mktemp("straight")
    job = submit(cluster, "single_node.sbatch", root / "run", root / "job.log")
    assert cluster.wait(job)[0] == "COMPLETED", (root / "job.log").read_text()[-3000:]
    return root / "run"


def wait_for(condition, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition(), f"{what} did not happen:\n{log.read_text()[-3000:] if log.exists() else ''}"


def submit_and_wait_for_checkpoint(cluster: SlurmCluster, output_dir: Path, log: Path) -> int:
    job = submit(cluster, "single_node.sbatch", output_dir, log)
    wait_for(lambda: complete_checkpoints(output_dir), "a checkpoint", log)
    return job


def signal_usr1(cluster: SlurmCluster, job: int) -> None:
    """What `--signal=USR1@90` does before the time limit: USR1 to every process of the step."""
    result = subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def assert_same_as_straight(run: Path, straight: Path) -> None:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 121))
    assert max_weight_difference(run / "final", straight / "final") == 0.0


def test_preemption_signal_checkpoints_requeues_and_finishes(cluster, straight, tmp_path):
    run, log = tmp_path / "usr1", tmp_path / "usr1.log"
    job = submit_and_wait_for_checkpoint(cluster, run, log)
    signal_usr1(cluster, job)
    state, exit_code, restarts = cluster.wait(job)
    text = log.read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-4000:]
    assert restarts >= 1 and "preempted (exit 75); requeueing" in text and "resumed from" in text
    assert_same_as_straight(run, straight)


def test_requeued_job_resumes_to_the_same_weights(cluster, straight, tmp_path):
    requeued, log = tmp_path / "requeued", tmp_path / "requeued.log"
    job = submit_and_wait_for_checkpoint(cluster, requeued, log)
    cluster.requeue(job)
    state, exit_code, restarts = cluster.wait(job)
    assert (state, exit_code) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    assert restarts >= 1
    text = log.read_text()
    assert f"job {job} (restart 1)" in text and "resumed from" in text
    assert_same_as_straight(requeued, straight)


def test_a_segment_that_makes_no_progress_is_not_requeued(cluster, tmp_path):
    """A validation longer than what is left of a job segment: every requeued segment would
    resume at the same step, redo the validation and be stopped inside it again, forever.
    The first stop made progress (five steps) and is requeued; the second made none and ends
    the job, with the checkpoint it resumed from intact."""
    train, validation = tmp_path / "train.csv", tmp_path / "validation.csv"
    rows = ["text,label"] + [
        f"review {i} was {('good', 'bad')[i % 2]},{('positive', 'negative')[i % 2]}" for i in range(6000)
    ]
    train.write_text("\n".join(rows[:401]) + "\n")
    # About 6 s of validation one example at a time: the signals below land inside it.
    validation.write_text("\n".join(rows) + "\n")
    run, log = tmp_path / "run", tmp_path / "job.log"
    overrides = (
        "data.dataset=files",
        f"data.train_file={train}",
        f"data.validation_file={validation}",
        "data.max_eval_samples=null",
        "train.eval_batch_size=1",
        "train.max_steps=10",
        "train.eval_every_steps=5",
    )
    job = submit(cluster, "single_node.sbatch", run, log, overrides=overrides)

    def logged_step_5() -> bool:
        metrics = run / "metrics.jsonl"
        return metrics.exists() and '"step": 5,' in metrics.read_text()

    wait_for(logged_step_5, "step 5", log)
    signal_usr1(cluster, job)  # inside the validation after step 5
    wait_for(lambda: "step-00000005 (step 5)" in log.read_text(), "the resumed segment", log)
    signal_usr1(cluster, job)  # inside the same validation, redone
    state, exit_code, restarts = cluster.wait(job)
    text = log.read_text()
    assert (state, exit_code, restarts) == ("FAILED", "75:0", 1), text[-4000:]
    assert "preempted (exit 75); requeueing" in text
    assert "with no progress since the checkpoint this segment resumed from; not requeueing" in text
    assert "Give the job more time" in text
    checkpoints = complete_checkpoints(run)
    saved = json.loads((checkpoints[-1] / "training_state.json").read_text())["state"]
    assert [c.name for c in checkpoints] == ["step-00000005"] and saved["eval_pending"] is True


def test_the_restart_cap_ends_a_preempted_job(cluster, tmp_path):
    run, log = tmp_path / "capped", tmp_path / "capped.log"
    job = submit(cluster, "single_node.sbatch", run, log, env={"DISTSENT_MAX_RESTARTS": "0"})
    wait_for(lambda: complete_checkpoints(run), "a checkpoint", log)
    signal_usr1(cluster, job)
    state, exit_code, restarts = cluster.wait(job)
    text = log.read_text()
    assert (state, exit_code, restarts) == ("FAILED", "75:0", 0), text[-4000:]
    assert "after 0 restart(s), the cap DISTSENT_MAX_RESTARTS=0; not requeueing" in text
    assert len(complete_checkpoints(run)) >= 1 and not (run / "final").exists()
    # A cap that is no number is refused before training, not found wanting after it.
    bad, bad_log = tmp_path / "bad_cap", tmp_path / "bad_cap.log"
    job = submit(cluster, "single_node.sbatch", bad, bad_log, env={"DISTSENT_MAX_RESTARTS": "three"})
    state, exit_code, _ = cluster.wait(job)
    assert (state, exit_code) == ("FAILED", "2:0"), bad_log.read_text()[-3000:]
    assert "DISTSENT_MAX_RESTARTS=three is not a whole number" in bad_log.read_text()
