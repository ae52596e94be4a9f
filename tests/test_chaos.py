"""Chaos on real SSH hosts: kills, stops, cut links and poison, and every result exactly once.

Each test runs a job of identifiable tasks (`test_echo_after(i, seconds)` returns i) over
network-namespace hosts with real sshd, breaks something while the job runs, and then
checks that every task resolved exactly once with the right value. Liveness is tightened
(heartbeats every 0.25 s, lost after 2 s) so the tests stay short; waits are on events.
The security cases (unknown and changed host keys) live in tests/test_ssh_transport.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from batuta import Pool, Task, TaskStatus
from batuta.runtime import events as pe
from batuta.runtime.cluster import build_pool, load_cluster
from tests.support.hosts import TestHost, TestHosts

REPO = Path(__file__).resolve().parents[1]
KERNELS = "tests.support.misbehaving_kernels"
WAIT_S = 90.0


def cluster_file(hosts: TestHosts, tmp_path: Path, *, slots: int = 2) -> Path:
    entries = "\n".join(f'[[hosts]]\naddress = "{h.name}"\n' for h in hosts)
    path = tmp_path / "cluster.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [defaults]
            python = "{sys.executable}"
            slots = {slots}
            gpus = "none"
            kernel_modules = ["{KERNELS}"]
            env = {{ PYTHONPATH = "{REPO}" }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"
            connect_timeout = 3

            [pool]
            heartbeat_interval = 0.25
            suspect_after = 0.8
            lost_after = 2.0
            relaunch_backoff = 0.2
            max_relaunches = 30
            """
        )
        + "\n"
        + entries
    )
    return path


class Ledger:
    """Every TaskFinished event, to prove each task id resolved exactly once."""

    def __init__(self, pool: Pool) -> None:
        self.finished: Counter[int] = Counter()
        self.started_on: dict[str, asyncio.Event] = {}
        self.states: list[tuple[str, str]] = []
        pool.subscribe(self.observe)

    def observe(self, event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskFinished):
            self.finished[event.result.task_id] += 1
        elif isinstance(event, pe.TaskStarted):
            self.started_on.setdefault(event.host, asyncio.Event()).set()
        elif isinstance(event, pe.HostStateChanged):
            self.states.append((event.host, event.state))

    async def started(self, host: str) -> None:
        await asyncio.wait_for(self.started_on.setdefault(host, asyncio.Event()).wait(), WAIT_S)


async def run_job_with(
    pool: Pool, count: int, seconds: float, break_something: Callable[[Ledger], Awaitable[None]]
) -> tuple[list[int], Ledger]:
    ledger = Ledger(pool)
    futures = [await pool.submit(Task.kernel("test_echo_after", i, seconds)) for i in range(count)]
    await break_something(ledger)
    results = await asyncio.wait_for(asyncio.gather(*(f.asyncio_future() for f in futures)), WAIT_S)
    assert all(r.status is TaskStatus.SUCCEEDED for r in results), [r.error for r in results if not r.is_success()]
    assert [r.value for r in results] == list(range(count))
    assert set(ledger.finished) == {f.task_id for f in futures}
    assert set(ledger.finished.values()) == {1}, "a task resolved more than once"
    return [r.attempts for r in results], ledger


def agent_of(host: TestHost) -> psutil.Process:
    """The host agent: a batuta.agent process whose parent is not one (slots are its forks)."""
    agents = [p for p in host.processes() if "batuta.agent" in " ".join(p.cmdline())]
    roots = [p for p in agents if p.ppid() not in {a.pid for a in agents}]
    assert len(roots) == 1, [(p.pid, p.ppid()) for p in agents]
    return roots[0]


def slots_of(host: TestHost) -> list[psutil.Process]:
    agent = agent_of(host)
    return [p for p in host.processes() if p.ppid() == agent.pid]


@pytest.fixture
def cluster_hosts(ssh_hosts: Callable[..., TestHosts]) -> TestHosts:
    return ssh_hosts(2)


async def test_kill_9_of_a_worker_slot_mid_task(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        victim_host = cluster_hosts[1]

        async def kill_a_slot(ledger: Ledger) -> None:
            await ledger.started(victim_host.name)
            slots_of(victim_host)[0].kill()

        attempts, _ = await run_job_with(pool, 24, 0.3, kill_a_slot)
        assert max(attempts) == 2 and pool.stats().retries >= 1


async def test_kill_9_of_a_host_agent(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        victim_host = cluster_hosts[0]
        killed: list[int] = []

        async def kill_the_agent(ledger: Ledger) -> None:
            await ledger.started(victim_host.name)
            agent = agent_of(victim_host)
            killed.append(agent.pid)
            agent.kill()

        downs: list[str] = []
        pool.subscribe(lambda e: downs.append(e.reason) if isinstance(e, pe.HostDown) else None)
        await run_job_with(pool, 24, 0.2, kill_the_agent)
        assert killed
        assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
        # how it ended, as sshd told it: the usual cause of a SIGKILL nobody sent is named
        assert downs == [
            "the agent was killed by signal 9 (SIGKILL): out of memory on the host (the kernel's OOM killer), "
            "if no one killed it"
        ]


async def test_sigstop_of_an_agent_beyond_the_heartbeat_timeout(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        victim_host = cluster_hosts[1]
        stopped: list[psutil.Process] = []

        async def stop_the_agent(ledger: Ledger) -> None:
            await ledger.started(victim_host.name)
            agent = agent_of(victim_host)
            stopped.append(agent)
            agent.send_signal(signal.SIGSTOP)

        try:
            _, ledger = await run_job_with(pool, 24, 0.2, stop_the_agent)
        finally:
            for agent in stopped:  # let it see its closed channel and exit
                if psutil.pid_exists(agent.pid):
                    agent.send_signal(signal.SIGCONT)
        assert (victim_host.name, "suspected") in ledger.states


async def test_link_cut_for_10_s_and_restored(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        victim_host = cluster_hosts[0]
        back = asyncio.Event()
        pool.subscribe(
            lambda e: (
                back.set()
                if isinstance(e, pe.HostStateChanged) and e.host == victim_host.name and e.state == "up"
                else None
            )
        )

        async def cut_then_restore(ledger: Ledger) -> None:
            await ledger.started(victim_host.name)
            victim_host.cut_link()
            await asyncio.sleep(10.0)  # the scenario itself: a ten-second outage, not a wait
            victim_host.restore_link()

        await run_job_with(pool, 40, 0.2, cut_then_restore)
        await asyncio.wait_for(back.wait(), WAIT_S)  # relaunched once reachable again
        result = await asyncio.wait_for(pool.run(Task.kernel("noop", 1)), WAIT_S)
        assert result.value == 1


async def test_poison_task_fails_clearly_and_the_cluster_keeps_running(
    cluster_hosts: TestHosts, tmp_path: Path
) -> None:
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        poison = await pool.submit(Task.kernel("test_crash", max_attempts=3))
        others = [await pool.submit(Task.kernel("test_echo_after", i, 0.05)) for i in range(20)]
        result = await asyncio.wait_for(poison, WAIT_S)
        assert result.status is TaskStatus.LOST and result.attempts == 3
        assert "worker died on all 3 attempts" in (result.error or "")
        assert [(await asyncio.wait_for(f, WAIT_S)).value for f in others] == list(range(20))


async def test_coordinator_exit_leaves_no_agent_on_the_hosts(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    path = cluster_file(cluster_hosts, tmp_path)
    async with build_pool(load_cluster(path)) as pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        started = [p for h in cluster_hosts for p in h.processes()]
        assert started
    _gone, alive = psutil.wait_procs(started, timeout=20)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


async def test_start_up_goes_on_without_a_silent_host_which_joins_when_it_answers(
    cluster_hosts: TestHosts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that does not answer held the first task back for connect_timeout: start-up
    says which host it waits for once another is up, goes on after start_wait, and the
    silent host joins the running pool when it answers."""
    path = cluster_file(cluster_hosts, tmp_path)
    text = path.read_text().replace("connect_timeout = 3", "connect_timeout = 60")
    path.write_text(text.replace("[pool]\n", "[pool]\nstart_wait = 3\n"))
    silent, other = cluster_hosts[1], cluster_hosts[0]
    silent.cut_link()
    try:
        async with asyncio.timeout(WAIT_S), build_pool(load_cluster(path)) as pool:
            noted = [r.getMessage() for r in caplog.records if r.name == "batuta.runtime.hosts"]
            assert noted == [
                f"start-up waits for {silent.name} (1 of 2 hosts up): until it answers or gives up "
                "(connect_timeout in [ssh], start_timeout in [pool]), 1 s more at most: then tasks "
                "start without it (start_wait in [pool])",
                f"start-up goes on with 1 of 2 hosts up; {silent.name} joins when it answers (start_wait in [pool])",
            ]
            states = {view.name: view.state for view in pool.hosts()}
            assert states == {other.name: "up", silent.name: "starting"}
            assert await pool.map("test_echo_after", [(1, 0.0)]) == [1]
            joined = asyncio.Event()
            pool.subscribe(lambda e: joined.set() if isinstance(e, pe.HostUp) and e.host == silent.name else None)
            silent.restore_link(wait=False)  # its SSH connect's next SYN gets through
            await joined.wait()
            assert {view.name: view.state for view in pool.hosts()} == {other.name: "up", silent.name: "up"}
            done = await asyncio.gather(*[pool.run(Task.kernel("test_echo_after", i, 0.3)) for i in range(8)])
            assert [r.value for r in done] == list(range(8))
            assert {r.host for r in done} == {other.name, silent.name}
    finally:
        silent.restore_link()


def test_cluster_status_reports_every_host(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    import json
    import subprocess

    path = cluster_file(cluster_hosts, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "batuta", "cluster", "status", "--cluster", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [h["host"] for h in report["hosts"]] == [h.name for h in cluster_hosts]
    assert all(h["state"] == "up" and h["cpu_slots"] == 2 and h["gpus"] == [] for h in report["hosts"])
    cluster_hosts[1].cut_link()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batuta", "cluster", "status", "--cluster", str(path), "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    finally:
        cluster_hosts[1].restore_link()
    assert done.returncode == 1
    assert "unreachable" in done.stdout and cluster_hosts[1].name in done.stdout
    cut_row = next(line for line in done.stdout.splitlines() if line.startswith(cluster_hosts[1].name))
    assert "no GPU" not in cut_row  # what an unreachable host has is unknown, not "none"
    assert any("no GPU" in line for line in done.stdout.splitlines() if line.startswith(cluster_hosts[0].name))


async def test_kill_9_of_a_host_holding_kept_values_mid_pipeline(cluster_hosts: TestHosts, tmp_path: Path) -> None:
    """Kept results on the killed host are made again from their recorded tasks (lineage); the
    tasks that read them wait, then run, and every chain's result is the undisturbed one."""
    async with build_pool(load_cluster(cluster_file(cluster_hosts, tmp_path))) as pool:
        fills: list[str | None] = []
        lost = asyncio.Event()
        pool.subscribe(
            lambda e: (
                fills.append(e.result.host) if isinstance(e, pe.TaskFinished) and e.result.name == "test_fill" else None
            )
        )
        gate_file = tmp_path / "open"  # the namespaces share the file system
        gate = await pool.submit(Task.kernel("test_gate", str(gate_file), 1, WAIT_S))
        n = 300_000
        firsts = [await pool.submit(Task.kernel("test_fill", n, float(i)), keep=True) for i in range(8)]
        made = [await asyncio.wait_for(f.asyncio_future(), WAIT_S) for f in firsts]
        assert all(r.is_success() for r in made), [r.error for r in made]
        seconds = [await pool.submit(Task.kernel("test_stage", f, 2.0, gate), keep=True) for f in firsts]
        finals = [await pool.submit(Task.kernel("sum", s)) for s in seconds]
        victim = next(h for h in cluster_hosts if h.name == made[0].host)
        pool.subscribe(lambda e: lost.set() if isinstance(e, pe.HostDown) and e.host == victim.name else None)
        agent_of(victim).kill()
        await asyncio.wait_for(lost.wait(), WAIT_S)
        gate_file.write_text("open")
        totals = await asyncio.wait_for(asyncio.gather(*(f.asyncio_future() for f in finals)), WAIT_S)
        for i, total in enumerate(totals):
            assert total.is_success(), total.error
            assert total.value == pytest.approx(n * (i * 2.0 + 1.0))  # identical to an undisturbed run
        on_victim = sum(1 for r in made if r.host == victim.name)
        assert on_victim >= 1 and len(fills) == 8 + on_victim  # each lost value made again, once


async def test_a_retry_goes_to_a_host_heard_from_not_to_a_suspected_one(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path
) -> None:
    """Host A is lost while B is suspected (silent, not lost yet) and C runs a task: A's task,
    which had started, was retried on B, idle but silent, where it waited for B to answer or
    be lost too (and its loss there counted again). A retry goes to a host up and heard from."""
    hosts = ssh_hosts(3)
    a, b, c = hosts[0], hosts[1], hosts[2]
    path = cluster_file(hosts, tmp_path, slots=1)
    text = path.read_text().replace("lost_after = 2.0", "lost_after = 120")  # B stays suspected
    path.write_text(text.replace("[pool]\n", "[pool]\nstart_wait = 120\n"))  # every host up first
    async with build_pool(load_cluster(path)) as pool:
        ledger = Ledger(pool)
        suspected, heard, retried = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def observe(e: pe.PoolEvent) -> None:
            if isinstance(e, pe.HostStateChanged) and e.host == b.name and e.state == "suspected":
                suspected.set()
            elif isinstance(e, pe.HostStateChanged) and e.host == b.name and e.state == "up" and suspected.is_set():
                heard.set()
            elif isinstance(e, pe.TaskRequeued) and e.slot.startswith(f"{a.name}/"):
                retried.set()

        pool.subscribe(observe)
        pool.drain(b.name)  # the gated tasks go to A and C, one each
        gate_file = tmp_path / "open"  # the namespaces share the file system
        futures = [await pool.submit(Task.kernel("test_gate", str(gate_file), i, WAIT_S)) for i in range(2)]
        await ledger.started(a.name)
        await ledger.started(c.name)
        pool.drain(b.name, undo=True)  # B: up, idle, the least busy host
        silent = agent_of(b)
        silent.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(suspected.wait(), WAIT_S)
            agent_of(a).kill()
            await asyncio.wait_for(retried.wait(), WAIT_S)
        finally:
            silent.send_signal(signal.SIGCONT)
        await asyncio.wait_for(heard.wait(), WAIT_S)
        gate_file.write_text("open")
        results = await asyncio.wait_for(asyncio.gather(*(f.asyncio_future() for f in futures)), WAIT_S)
        assert all(r.is_success() for r in results), [r.error for r in results]
        retry = max(results, key=lambda r: r.attempts)
        assert (retry.attempts, retry.host) == (2, c.name)  # not B, suspected when A was lost
        assert b.name not in {r.host for r in results}
