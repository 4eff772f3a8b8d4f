"""Observability: one W&B run (offline, real files), resumed as the same run; plots; report; secrets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from distsent.checkpoint import STATE_FILE, complete_checkpoints
from distsent.preemption import EXIT_PREEMPTED
from tests.conftest import REPO, TINY, cli_env, read_summary, run_captured, run_cli
from tests.test_resume import distsent_command, train_losses, wait_for_step
from tests.wandb_offline import read_offline_run

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
WANDB = ["log.wandb=true", "log.project=distsent-tests", "log.tags=[ci, tiny]"]


def wandb_env() -> dict[str, str]:
    return {**cli_env(), "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "true"}


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


def assert_no_secret(output_dir: Path) -> None:
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"{path} contains WANDB_API_KEY"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wandb") / "run"
    command = distsent_command(
        2, "train", *TINY, *WANDB, "train.max_steps=20", "train.eval_every_steps=10", f"output_dir={out}"
    )
    result = run_captured(command, env=wandb_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_processes_make_exactly_one_wandb_run(two_process_run):
    (run_dir,) = offline_runs(two_process_run)
    run = read_offline_run(run_dir)
    keys = set().union(*run["history"])
    throughput = {"train/grad_norm", "train/tokens_per_second", "train/examples_per_second"}
    assert {"train/loss", "train/lr", "validation/accuracy", *throughput} <= keys
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    jsonl = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert losses == [e["loss"] for e in jsonl if e["event"] == "train"]  # the all-rank mean, as logged
    assert run["config"]["train"]["max_steps"] == 20 and run["config"]["model"]["name"] == "tiny-bert"
    assert_no_secret(two_process_run)


@pytest.mark.slow
def test_wandb_charts_step_by_the_logged_optimizer_step(two_process_run):
    """W&B's own step only grows and drops a record below it (a validation a resume redoes at
    the step it was cut off at): every record carries global_step, the charts' x-axis."""
    run = read_offline_run(offline_runs(two_process_run)[0])
    assert all("global_step" in row for row in run["history"] if "train/loss" in row or "validation/loss" in row)
    assert [row["global_step"] for row in run["history"] if "validation/loss" in row] == [10, 16, 20]
    assert run["step_metrics"].get("*") == "global_step"


@pytest.mark.slow
def test_plots_metrics_and_report(two_process_run):
    events = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert {e["event"] for e in events} == {"train", "eval"}
    assert [e["step"] for e in events if e["event"] == "eval"] == [10, 16, 20]  # every 10 steps and the epoch end
    plots = two_process_run / "plots"
    names = {"learning_curves.png", "confusion_matrix.png", "roc.png"}
    assert {p.name for p in plots.iterdir()} == names
    assert all((plots / n).stat().st_size > 10_000 for n in names)
    shutil.rmtree(plots)
    result = run_cli("report", str(two_process_run))
    assert {Path(line).name for line in result.stdout.split()} == names
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    card = (two_process_run / "best" / "README.md").read_text()
    assert "tiny-bert" in card and "accuracy" in card and "negative" in card
    # As trained, not as configured: the export's step, both processes, the resolved precision.
    best_step = read_summary(two_process_run)["best_metric"]["step"]
    assert f"- Training: {best_step} optimizer steps (" in card
    assert "global batch 16 (8 per process x 2\n  process(es) x 1 accumulation), precision no" in card


def test_a_run_without_wandb_keeps_the_wandb_run_id_for_the_next(tmp_path):
    """A segment resumed with log.wandb=false (or whose W&B failed to start) must pass the run
    id on: the next segment with W&B continues the same W&B run, not a new one."""
    out = tmp_path / "segments"
    base = ["train", *TINY, "train.max_steps=8", "checkpoint.every_steps=2", f"output_dir={out}"]
    run_cli(*base, *WANDB, env=wandb_env())
    (offline,) = offline_runs(out)
    first_id = read_offline_run(offline)["run_id"]
    # The segment without W&B goes on from step 4 and writes the step-6 checkpoint anew.
    assert [c.name for c in complete_checkpoints(out)][-2:] == ["step-00000004", "step-00000006"]
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    run_cli(*base, "train.resume=auto", "log.wandb=false", env=wandb_env())
    payload = json.loads((out / "checkpoints" / "step-00000006" / STATE_FILE).read_text())
    assert payload["state"]["wandb_run_id"] == first_id


@pytest.mark.slow
def test_wandb_that_cannot_be_imported_costs_the_record_not_the_run(tmp_path):
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken wandb install')\n")
    out = tmp_path / "run"
    env = {**wandb_env(), "PYTHONPATH": f"{broken.parent}:{REPO}"}
    result = run_cli("train", *TINY, *WANDB, "train.max_steps=2", f"output_dir={out}", env=env)
    assert "wandb cannot be imported (a broken wandb install); the run goes on without it" in result.stderr
    assert read_summary(out)["global_step"] == 2


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "resumed"
    args = [
        "train",
        *TINY,
        *WANDB,
        "train.max_steps=30",
        "checkpoint.every_steps=100",
        "train.log_every_steps=1",
        f"output_dir={out}",
    ]
    process = subprocess.Popen(
        distsent_command(2, *args),
        cwd=REPO,
        env=wandb_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(out, 10, process)
    worker = max(c.pid for c in psutil.Process(process.pid).children(recursive=True) if "distsent" in c.cmdline())
    os.kill(worker, signal.SIGTERM)
    process.communicate(timeout=300)
    assert not (out / "final").exists()
    resumed = run_captured(distsent_command(2, *args, "train.resume=auto"), env=wandb_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    runs = [read_offline_run(d) for d in offline_runs(out)]
    assert len(runs) == 2 and runs[0]["run_id"] == runs[1]["run_id"]
    steps = [row["global_step"] for run in runs for row in run["history"] if "train/loss" in row]
    assert steps[-1] == 30 and read_summary(out)["global_step"] == 30
    assert_no_secret(out)


def test_sigterm_to_the_whole_job_still_checkpoints_with_wandb_on(tmp_path):
    """Slurm's requeue, preemption and scancel signal every process of the job, wandb's own
    background process too, which dies of it. The next W&B call then fails; the run must
    still write its preemption checkpoint and exit 75, not crash with a W&B traceback."""
    out = tmp_path / "requeued"
    marker = tmp_path / "preempted.json"
    args = ["train", *TINY, *WANDB, "train.max_steps=400", "train.log_every_steps=1", f"output_dir={out}"]
    process = subprocess.Popen(
        distsent_command(1, *args),
        cwd=REPO,
        env={**wandb_env(), "DISTSENT_PREEMPTED_FILE": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(out, 5, process)
    job = psutil.Process(process.pid)
    descendants = job.children(recursive=True)
    assert any("wandb" in " ".join(c.cmdline()) for c in descendants)
    # As slurmstepd does: every process of the step, whatever its process group or session.
    for member in (job, *descendants):
        member.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert json.loads(marker.read_text())["exit_code"] == EXIT_PREEMPTED
    stopped_at = max(step for step, _ in train_losses(out))
    assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir(), sorted((out / "checkpoints").iterdir())
    assert "W&B stopped working" in output


def test_unreachable_wandb_server_logs_offline_instead(tmp_path):
    """No network (or a wrong key) must not cost the training job: W&B falls back to offline."""
    out = tmp_path / "no_network"
    env = {
        **wandb_env(),
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
        "WANDB_INIT_TIMEOUT": "10",
    }
    result = run_cli("train", *TINY, *WANDB, "train.max_steps=6", f"output_dir={out}", env=env)
    assert "W&B could not start (CommError" in result.stderr and "logging offline instead" in result.stderr
    (offline,) = offline_runs(out)
    run = read_offline_run(offline)
    assert [row["global_step"] for row in run["history"] if "train/loss" in row] == [5, 6]
    assert run["config"]["run"]["world_size"] == 1 and run["config"]["run"]["mixed_precision"] == "no"
    assert_no_secret(out)


def test_report_reads_the_cut_off_line_a_killed_run_leaves(tmp_path):
    from distsent.checkpoint import CheckpointError
    from distsent.plots import read_events

    history = tmp_path / "metrics.jsonl"
    history.write_text('{"event": "train", "step": 5, "loss": 0.7}\n{"event": "train", "st')
    assert read_events(tmp_path) == [{"event": "train", "step": 5, "loss": 0.7}]
    history.write_text('{"event": "train", "step": 5, "loss": 0.7}\nnot json\n{"event": "train", "step": 10}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: not a JSON object"):
        read_events(tmp_path)


def test_library_warnings_are_printed_once_in_the_run_format():
    # huggingface_hub's own handler and the root's both printed each Hub retry warning;
    # transformers printed in a format of its own (and twice under CI=true).
    script = (
        "import logging; from distsent.__main__ import _configure_logging; _configure_logging(0); "
        "import huggingface_hub.utils._http, transformers.utils.logging, datasets.load; "
        "transformers.utils.logging.get_logger('transformers.modeling_utils'); "
        "logging.getLogger('huggingface_hub.utils._http').warning('hub retry'); "
        "logging.getLogger('datasets.load').warning('cache miss'); "
        "logging.getLogger('transformers.modeling_utils').warning('weights missing')"
    )
    env = {**cli_env(), "CI": "true"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if "hub retry" in line] == [
        "[rank0] WARNING huggingface_hub.utils._http: hub retry"
    ], result.stderr
    assert [line for line in lines if "cache miss" in line] == ["[rank0] WARNING datasets.load: cache miss"], (
        result.stderr
    )
    assert [line for line in lines if "weights missing" in line] == [
        "[rank0] WARNING transformers.modeling_utils: weights missing"
    ], result.stderr
