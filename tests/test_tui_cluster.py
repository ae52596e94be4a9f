"""`batuta tui --cluster FILE` end to end: the dashboard coordinating real SSH hosts.

Two hosts in network namespaces with their own sshd (tests/support/hosts.py); each agent
reports one fake GPU (BATUTA_FAKE_GPUS travels in the cluster file's `env`, which is for
settings, not secrets). The app builds the pool the way the `tui` command does.
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from batuta.tui.app import BatutaApp
from batuta.tui.snapshot import screen_text

from batuta.runtime.cluster import build_pool, load_cluster
from tests.support.hosts import TestHosts

REPO = Path(__file__).resolve().parent.parent
SIZE = (160, 50)

SPREAD_JOB = """\
from batuta import Task


async def main(pool):
    futures = [await pool.submit(Task.kernel("spin", 0.02)) for _ in range(40)]
    hosts = {(await future).host for future in futures}
    return f"ran on {len(hosts)} hosts"
"""


def cluster_file(hosts: TestHosts, tmp_path: Path) -> Path:
    entries = "\n".join(f'[[hosts]]\naddress = "{h.name}"\n' for h in hosts)
    path = tmp_path / "cluster.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [defaults]
            python = "{sys.executable}"
            slots = 1
            gpus = "none"
            env = {{ PYTHONPATH = "{REPO}", BATUTA_FAKE_GPUS = "1" }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"
            connect_timeout = 5
            """
        )
        + "\n"
        + entries
    )
    return path


async def until(pilot: object, predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await pilot.pause(0.1)  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_dashboard_on_two_ssh_hosts(ssh_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    hosts = ssh_hosts(2)
    cluster = load_cluster(cluster_file(hosts, tmp_path))
    job = tmp_path / "spread.py"
    job.write_text(SPREAD_JOB)
    app = BatutaApp(build_pool(cluster), cluster_label="cluster.toml (2 hosts)", start_jobs=[str(job)])
    async with app.run_test(size=SIZE) as pilot:
        model = app.model
        names = [h.name for h in hosts]
        await until(pilot, lambda: model.status == "running", "the SSH hosts to come up")
        await until(pilot, lambda: all(model.hosts[n].telemetry_seen for n in names if n in model.hosts), "telemetry")
        await until(pilot, lambda: model.jobs.get("spread") and model.jobs["spread"].state == "done", "the job")
        assert model.jobs["spread"].succeeded == 40
        assert {n for n in names if model.hosts[n].done > 0} == set(names)  # work went to both
        await until(pilot, lambda: all(n in screen_text(app) for n in names), "both hosts on screen")
        # gpus = "none": each host's GPU is said to be there, and not batuta's (no slot runs on it)
        await until(pilot, lambda: screen_text(app).count("GPU 0  unused: no slot runs on it") == 2, "each host's GPU")
        assert "hosts 2/2" in screen_text(app)
