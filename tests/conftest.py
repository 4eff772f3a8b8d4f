"""Shared helpers: run the real CLI in a subprocess, read run folders."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest

from distsent.modeling import HEAD_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
# Small and quick: tiny-bert, a few hundred examples, fp32 so results are exact.
TINY = [
    "model.name=tiny-bert",
    "data.max_train_samples=256",
    "data.max_eval_samples=101",
    "train.batch_size=8",
    "train.mixed_precision=no",
    "train.log_every_steps=5",
]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("OMP_NUM_THREADS", "1")
    # DeepSpeed's JIT-built ops go in this checkout, not the user-wide ~/.cache: test runs of
    # other checkouts on the machine neither wait on these builds' locks nor inherit stale ones.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill `process` and every process below it. Launchers start their workers in sessions of
    their own (torch elastic), so neither killing the launcher nor its process group reaches
    them; left running, they would hold the CPUs for the rest of the suite."""
    if process.poll() is not None:
        return  # ended and reaped: its pid may already be another process's
    try:
        tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def run_captured(
    command: list[str], *, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) in the repository, except that
    a command running past `timeout` is killed with all its children and fails the test with
    what it printed; an interrupted test kills them too."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=cli_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{' '.join(map(str, command))} ran past {timeout} s; killed with its children\n"
            f"{stdout[-4000:]}\n{stderr[-6000:]}"
        )
    except BaseException:
        kill_process_tree(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_cli(
    *args: str, check: bool = True, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m distsent ARGS`, captured; fails the test with the output when check is set.

    `env` adds to (or replaces) the variables of `cli_env()`."""
    result = run_captured([sys.executable, "-m", "distsent", *args], env={**cli_env(), **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(
            f"distsent {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture
def tcmalloc() -> str:
    """The tcmalloc library distsent preloads; fails the test where the machine lacks it."""
    from distsent.allocator import find_tcmalloc

    library = find_tcmalloc()
    if library is None:
        pytest.fail("no libtcmalloc on this machine: `make install` installs libtcmalloc-minimal4 when run as root")
    return library


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def write_labeled_csv(path: Path, rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    """(text, label name) rows as a CSV with a header row, as a user would bring them."""
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def accelerate_launch_command(config_file: str | Path, num_processes: int, *launch_args: str) -> list[str]:
    """`accelerate launch` up to what it runs; a bare name is a file in launch/accelerate/."""
    path = Path(config_file) if Path(config_file).is_absolute() else REPO / "launch" / "accelerate" / config_file
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(path),
        "--num_processes",
        str(num_processes),
        *launch_args,
    ]


def launch(
    config_file: str,
    num_processes: int,
    *args: str,
    extra_launch: tuple[str, ...] = (),
    check: bool = True,
    timeout: int = 600,
):
    """`accelerate launch --config_file launch/accelerate/X.yaml --num_processes N -m distsent ARGS`."""
    command = [*accelerate_launch_command(config_file, num_processes, *extra_launch), "-m", "distsent", *args]
    result = run_captured(command, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def load_weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(export_dir / "model.safetensors")
    head = export_dir / HEAD_WEIGHTS  # a distsent head's own weights (mean, cnn)
    if head.exists():
        weights.update({f"head.{name}": tensor for name, tensor in load_file(head).items()})
    return weights


def with_nan_classifier(export_dir: Path, copy_dir: Path) -> Path:
    """A copy of an export whose classifier weights are all NaN, so every output is NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(export_dir, copy_dir)
    weights = load_file(str(copy_dir / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if k.startswith("classifier.") else v for k, v in weights.items()}
    save_file(weights, str(copy_dir / "model.safetensors"))
    return copy_dir


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_weights(a), load_weights(b)
    assert set(wa) == set(wb), f"different tensors in {a} and {b}"
    return max(float((wa[name].float() - wb[name].float()).abs().max()) for name in wa)
