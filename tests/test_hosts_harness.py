"""The real-SSH test-host harness (tests/support/hosts.py): namespaces, sshd, keys, cuts, cleanup.

Every wait here is bounded and polls the condition itself; the only fixed durations are the
short timeouts that a cut link must run into.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import asyncssh
import psutil
import pytest

from tests.support import hosts as hosts_mod
from tests.support.conftest_hosts import require_test_hosts
from tests.support.hosts import SUBNET, HostsUnavailable, TestHost, TestHosts, owned_resources, sweep_stale

REPO = Path(__file__).resolve().parents[1]
HostsFactory = Callable[..., TestHosts]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def root_routes() -> str:
    return subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (bounded) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if predicate():
            return
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def named(host: TestHost, name: str) -> list[psutil.Process]:
    """The host's session processes called ``name`` (shells come and go meanwhile: tolerate that)."""
    found = []
    for proc in host.processes():
        with contextlib.suppress(psutil.Error):
            if proc.name() == name:
                found.append(proc)
    return found


async def remote_python(host: TestHost) -> str:
    async with asyncssh.connect(**host.asyncssh_options()) as conn:
        result = await conn.run(f"{sys.executable} -c 'print(1)'; echo $SSH_CONNECTION", check=True, timeout=20)
    return str(result.stdout)


def test_three_hosts_come_up_with_distinct_addresses(ssh_hosts: HostsFactory) -> None:
    hosts = ssh_hosts(3)
    assert len(hosts) == 3 and [h.name for h in hosts] == ["host0", "host1", "host2"]
    assert len({h.address for h in hosts}) == 3 and len({h.netns for h in hosts}) == 3
    existing = netns_names()
    for host in hosts:
        net = host.network
        assert net.prefixlen == 30 and net.subnet_of(SUBNET)
        assert (host.root_address, host.address) == (str(net[1]), str(net[2]))
        assert (host.port, host.user) == (22, "root")
        assert host.netns.startswith(f"bt{os.getpid()}-") and len(host.veth) <= 15
        assert host.netns in existing and host.veth in root_links()
        assert host.sshd_pid is not None and psutil.Process(host.sshd_pid).name() == "sshd"
        inside = host.run(["ip", "-4", "-o", "addr", "show"], check=True).stdout
        assert host.address in inside and "127.0.0.1" in inside  # lo is up
        assert "default" not in host.run(["ip", "route"], check=True).stdout  # can reach nothing else
        assert hosts[host.name] is host and hosts[host.address] is host
    assert stat.S_IMODE(os.stat(hosts.identity_file).st_mode) == 0o600
    known = hosts.known_hosts.read_text().splitlines()
    assert [line.split()[0] for line in known] == [f"{h.name},{h.address}" for h in hosts]
    config = hosts.ssh_config.read_text()
    assert all(f"Host {h.name}\n    HostName {h.address}\n" in config for h in hosts)
    assert config.count("StrictHostKeyChecking yes") == 3
    # The real OpenSSH client, through the generated config alone.
    for host in (hosts[0], hosts[2]):
        done = subprocess.run(["ssh", "-F", str(hosts.ssh_config), host.name, "true"], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr


def test_parallel_runs_get_disjoint_slots_and_names() -> None:
    require_test_hosts()
    runs: list[TestHosts] = [TestHosts(2, run_id=f"par{i}") for i in range(2)]
    errors: list[BaseException] = []

    def start(run: TestHosts) -> None:
        try:
            run.start()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(run,)) for run in runs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        hosts = [h for run in runs for h in run]
        assert len({h.slot for h in hosts}) == 4 and len({h.netns for h in hosts}) == 4
    finally:
        for run in runs:
            run.close()


async def test_asyncssh_runs_the_tests_python_on_every_host(ssh_hosts: HostsFactory) -> None:
    hosts = ssh_hosts(3)
    outputs = await asyncio.gather(*(remote_python(h) for h in hosts))
    for host, out in zip(hosts, outputs, strict=True):
        one, connection = out.splitlines()
        assert one == "1"
        assert connection.split()[0] == host.root_address and connection.split()[2] == host.address
    # The ssh_config alias works for asyncssh too; sessions get the tests' PATH.
    async with asyncssh.connect(hosts[1].name, config=[str(hosts.ssh_config)], agent_path=None) as conn:
        path = (await conn.run("echo $PATH", check=True, timeout=20)).stdout
    assert os.path.dirname(sys.executable) in str(path).strip().split(":")


async def test_processes_lists_what_sessions_started(ssh_hosts: HostsFactory) -> None:
    (host,) = ssh_hosts(1)
    async with asyncssh.connect(**host.asyncssh_options()) as conn:
        remote = await conn.create_process("exec sleep 60")
        await wait_until(lambda: bool(named(host, "sleep")), "the remote sleep")
        (sleeper,) = named(host, "sleep")
        assert not named(host, "sshd")
        assert host.sshd_pid in {p.pid for p in host.processes(include_sshd=True)}
        sleeper.kill()  # what a chaos test does to an agent
        completed = await asyncio.wait_for(remote.wait(), 10)
        assert completed.exit_signal is not None and completed.exit_signal[0] == "KILL"


async def test_cut_link_times_out_and_restore_link_recovers(ssh_hosts: HostsFactory) -> None:
    hosts = ssh_hosts(2)
    host, other = hosts[0], hosts[1]
    open_conn = await asyncssh.connect(**host.asyncssh_options())
    try:
        host.cut_link()
        assert not host.link_up
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await asyncssh.connect(**host.asyncssh_options(connect_timeout=1))
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # open sessions stall, no reset
            await asyncio.wait_for(open_conn.run("true"), 0.5)
        assert (await remote_python(other)).startswith("1\n")  # the others are unaffected
    finally:
        open_conn.abort()
    host.restore_link()
    assert host.link_up
    assert (await remote_python(host)).startswith("1\n")


async def test_regenerated_host_key_is_refused_until_trusted(ssh_hosts: HostsFactory) -> None:
    hosts = ssh_hosts(2)
    host = hosts[0]
    old_key, old_pid = host.host_public_key, host.sshd_pid
    new_key = host.regenerate_host_key()
    assert new_key != old_key and host.sshd_pid not in (None, old_pid)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await asyncssh.connect(**host.asyncssh_options())
    refused = subprocess.run(host.ssh_command("true"), capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255 and "IDENTIFICATION HAS CHANGED" in refused.stderr
    assert (await remote_python(hosts[1])).startswith("1\n")
    hosts.write_known_hosts()  # trust the new key
    assert (await remote_python(host)).startswith("1\n")


async def test_stop_and_start_sshd_by_pid(ssh_hosts: HostsFactory) -> None:
    (host,) = ssh_hosts(1)
    old_pid = host.sshd_pid
    async with asyncssh.connect(**host.asyncssh_options()) as conn:
        host.stop_sshd()
        assert host.sshd_pid is None and old_pid is not None and not psutil.pid_exists(old_pid)
        with pytest.raises(ConnectionRefusedError):
            await asyncssh.connect(**host.asyncssh_options(connect_timeout=5))
        assert (await conn.run("echo alive", check=True, timeout=20)).stdout == "alive\n"  # sessions survive
    assert host.start_sshd() not in (None, old_pid)
    assert (await remote_python(host)).startswith("1\n")


def _gone(names: set[str], pids: set[int], run_dir: Path, nets: list[ipaddress.IPv4Network]) -> None:
    assert not names & netns_names(), "namespaces left"
    assert not names & root_links(), "veth links left"
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not run_dir.exists()
    routes = root_routes()
    assert not [n for n in nets if str(n) in routes], routes


def test_everything_is_gone_after_exit_even_when_the_body_raises() -> None:
    require_test_hosts()
    with pytest.raises(RuntimeError, match="boom"), TestHosts(2) as hosts:
        # Leave what a crashed agent would: an orphan, and a stopped process.
        hosts[0].run("setsid sleep 300 </dev/null >/dev/null 2>&1 &", check=True)
        hosts[1].run("setsid sh -c 'kill -STOP $$; sleep 300' </dev/null >/dev/null 2>&1 &", check=True)
        names = {h.netns for h in hosts}
        nets = [h.network for h in hosts]
        pids = {p.pid for h in hosts for p in h.processes(include_sshd=True)}
        run_dir = hosts.dir
        assert len(pids) >= 4 and all(h.sshd_pid in pids for h in hosts)
        raise RuntimeError("boom")
    _gone(names, pids, run_dir, nets)
    hosts.close()  # idempotent


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.support.hosts import TestHosts
    hosts = TestHosts(2).start()  # never closed here: atexit or the next sweep must do it
    hosts[0].run("setsid sleep 300 </dev/null >/dev/null 2>&1 &", check=True)
    pids = [p.pid for h in hosts for p in h.processes(include_sshd=True)]
    print(json.dumps({{"pid": os.getpid(), "names": [h.netns for h in hosts], "pids": pids, "dir": str(hosts.dir),
                      "nets": [str(h.network) for h in hosts]}}), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_atexit_and_the_stale_sweep_clean_up_after_other_processes(ending: str) -> None:
    require_test_hosts()
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO)), ending], capture_output=True, text=True, timeout=60
    )
    assert child.stdout, child.stderr
    left = json.loads(child.stdout.splitlines()[-1])
    names, pids, run_dir = set(left["names"]), set(left["pids"]), Path(left["dir"])
    nets = [ipaddress.IPv4Network(n) for n in left["nets"]]
    if ending == "exit":
        assert child.returncode == 0, child.stderr
    else:
        assert child.returncode == -signal.SIGKILL
        assert names <= netns_names() and run_dir.exists()  # SIGKILL: nothing ran, all still there
        assert all(psutil.pid_exists(p) for p in pids)
        removed = sweep_stale()
        assert {f"netns {n}" for n in names} <= set(removed), removed
    _gone(names, pids, run_dir, nets)
    assert owned_resources(left["pid"]) == {"netns": [], "links": [], "dirs": []}


def test_missing_tools_skip_locally_and_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts_mod, "unavailable_reason", lambda: "`sshd` (openssh-server) not found")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="sshd"):
        require_test_hosts()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_test_hosts()
    with pytest.raises(HostsUnavailable, match="sshd"):
        TestHosts(1).start()


def test_no_resources_of_this_process_outlive_their_runs() -> None:
    """Runs by earlier tests in this process are closed: nothing named after our PID is left."""
    with contextlib.suppress(HostsUnavailable):
        if hosts_mod.unavailable_reason() is None:
            assert owned_resources() == {"netns": [], "links": [], "dirs": []}
