"""A real single-machine Slurm for the allocation tests: munged, slurmctld and two slurmd.

    with slurm_cluster(tmp_path) as cluster:      # skips when the slurm binaries are absent
        env = cluster.env                           # SLURM_CONF for sbatch, squeue, scancel
        subprocess.run(["srun", "-N2", "hostname"], env=env, check=True)

Everything lives under one temporary directory: the munge key and socket (slurm.conf's
`AuthInfo=socket=...` points Slurm at it, so no system munged is needed or touched), the
controller's state, each node's spool, logs and pid files. The nodes are `n1` and `n2`, one
`slurmd -N NAME` each, both `NodeAddr=127.0.0.1` with their own port; `proctrack/linuxproc` and
`task/none` need no cgroups and no systemd. Daemons run in the foreground (`-D`) as children
of the tests and are stopped by PID (SIGTERM, then SIGKILL after a bound) whatever happens.
Every wait is bounded: a daemon that does not come up fails the test naming its log.

Needs root (slurmd runs job steps as the submitting user, and the tests submit as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in BINARIES if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found is not None, name
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SlurmCluster:
    """The running daemons and what clients need to reach them (`env`)."""

    root: Path
    conf: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster (bounded)."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def jobs(self) -> list[str]:
        """Ids of the jobs still pending or running (not cancelled, completing or done)."""
        done = self.run("squeue", "-h", "-o", "%i %T")
        active = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "RESIZING"}
        rows = [line.split() for line in done.stdout.splitlines()]
        return [row[0] for row in rows if len(row) == 2 and row[1] in active]

    def wait_nodes_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until both nodes report idle (registered and free), or fail naming the logs."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            done = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            last = done.stdout + done.stderr
            states = dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)
            if all(states.get(node) == "idle" for node in NODES):
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"slurm nodes not idle within {timeout:g}s: {last!r}\n{self.log('slurmctld')}")

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def stop(self) -> None:
        """Cancel what is left, then stop every daemon by PID (TERM, then KILL after a bound)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run("scancel", "--user=root", timeout=10)
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)


def _slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs=1 RealMemory=500 State=UNKNOWN"
        for name, port in node_ports.items()
    )
    return f"""\
# written by tests/support/slurm.py
ClusterName=batutatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
KillWait=5
MinJobAge=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(tmp: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd n1, n2 under `tmp`; stop them all on the way out."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm not installed (no {', '.join(missing)}); apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root: slurmd runs job steps as the submitting user")
    root = tmp / "slurm"
    for sub in ("munge", "ctld", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(128))
    ports = {name: _free_port() for name in NODES}
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, _free_port(), ports))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env.pop("SLURM_JOB_ID", None)
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    try:
        cluster.processes["munged"] = _spawn(
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge/munge.socket",
                f"--pid-file={root}/run/munged.pid",
                f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/munge/munge.seed",
            ],
            root / "log" / "munged.out",
            env,
        )
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), cluster, "munged")
        cluster.processes["slurmctld"] = _spawn(
            [_which("slurmctld"), "-D", "-i", "-f", str(conf)], root / "log" / "slurmctld.out", env
        )
        _wait_for(lambda: cluster.run("sinfo", "-h", timeout=5).returncode == 0, cluster, "slurmctld")
        for name in NODES:
            cluster.processes[f"slurmd-{name}"] = _spawn(
                [_which("slurmd"), "-D", "-N", name, "-f", str(conf)], root / "log" / f"slurmd-{name}.out", env
            )
        cluster.wait_nodes_idle()
        yield cluster
    finally:
        cluster.stop()


def _spawn(argv: list[str], output: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(output, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _wait_for(ready: object, cluster: SlurmCluster, what: str) -> None:
    assert callable(ready)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        cluster._check_alive()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if ready():
                return
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} not ready within {START_TIMEOUT_S:g}s:\n{cluster.log(what)}")
