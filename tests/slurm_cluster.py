"""A real one-node Slurm cluster on this machine, for the sbatch tests.

Installs Debian's slurm-wlm and munge when missing, writes a slurm.conf for this host into
a temporary folder, starts munged, slurmctld and slurmd, waits for the node to be idle,
and stops everything afterwards. Any failing step fails the test with what went wrong."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SLURM_CONF = """\
ClusterName=distsent-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back this long before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# Slurm's default is 30 s: a busy 2-core CI machine can need longer to checkpoint after SIGTERM.
KillWait=60
MinJobAge=3600
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def install_slurm() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.fail("Slurm is not installed and the tests are not root: apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = _run(command, env=env, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """Daemons for one node; `env` is what sbatch/scontrol need (SLURM_CONF)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        install_slurm()
        host = socket.gethostname().split(".")[0]
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        for folder in ("state", "spool", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            SLURM_CONF.format(
                host=host,
                root=self.root,
                cpus=os.cpu_count(),
                memory_mb=int(memory_mb * 0.9),
                ctld_port=_free_port(),
                d_port=_free_port(),
            )
        )
        self._start_munge()
        self.processes.append(
            subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        self.processes.append(
            subprocess.Popen(
                ["slurmd", "-D", "-f", str(self.conf)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            state = _run(["sinfo", "-h", "-o", "%T"], env=self.env).stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(1)
        pytest.fail(f"the Slurm node never became idle (sinfo: {state!r}); logs:\n{self.logs()}")

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            result = _run(["mungekey", "--create", "--force"])
            if result.returncode != 0:
                pytest.fail(f"mungekey failed: {result.stderr}")
        munge_dir = self.root / "munge"
        # As root with --force: the daemon accepts a private socket folder under /tmp.
        result = _run(
            [
                "munged",
                "--force",
                "--socket", str(munge_dir / "munge.socket"),
                "--pid-file", str(munge_dir / "munged.pid"),
                "--log-file", str(munge_dir / "munged.log"),
                "--seed-file", str(munge_dir / "seed"),
            ]
        )  # fmt: skip
        if result.returncode != 0:
            pytest.fail(f"munged failed to start: {result.stderr}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        result = _run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})})
        if result.returncode != 0:
            pytest.fail(f"sbatch failed: {result.stderr}\n{self.logs()}")
        return int(result.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> tuple[str, str, int]:
        """(JobState, ExitCode, Restarts) from `scontrol show job`."""
        fields = {}
        for token in _run(["scontrol", "show", "job", str(job_id)], env=self.env).stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields.get("JobState", "?"), fields.get("ExitCode", "?"), int(fields.get("Restarts", "0") or 0)

    def wait(self, job_id: int, timeout: float = 600) -> tuple[str, str, int]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return state
            time.sleep(1)
        pytest.fail(f"job {job_id} did not finish in {timeout}s: {self.job_state(job_id)}\n{self.logs()}")

    def requeue(self, job_id: int) -> None:
        result = _run(["scontrol", "requeue", str(job_id)], env=self.env)
        if result.returncode != 0:
            pytest.fail(f"scontrol requeue {job_id} failed: {result.stderr}")

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.is_file():
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
