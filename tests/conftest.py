"""Shared helpers: run the real CLI in a subprocess, read run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    return env


def run_cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m distsent ARGS`, captured; fails the test with the output when check is set."""
    result = subprocess.run(
        [sys.executable, "-m", "distsent", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        pytest.fail(f"distsent {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())
