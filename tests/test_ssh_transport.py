"""The SSH transport: unit tests of its parts, then real sshd hosts from `tests/support/hosts.py`.

The unit half needs no server: command quoting, env redaction, ProxyJump parsing, option
assembly from an ssh config, known_hosts appends and the host-key policy. The integration
half runs against OpenSSH servers in network namespaces (the shared harness) and is skipped
where that harness cannot run (no root, no sshd).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import numpy as np
import psutil
import pytest

from batuta.core.task import Task, TaskStatus
from batuta.errors import AgentError
from batuta.runtime.cluster import ClusterHost, build_pool, load_cluster, ssh_host
from batuta.runtime.events import HostDown, HostStateChanged
from batuta.runtime.pool import Pool, PoolConfig
from batuta.transport import ssh, ssh_known_hosts
from batuta.transport.base import StreamClosedError
from batuta.transport.ssh import (
    HostKeyError,
    SSHConnectError,
    SSHSettings,
    SSHTarget,
    append_known_host,
    known_hosts_pattern,
    redacted_command,
    remote_command,
)
from batuta.transport.ssh_ciphers import cpu_has_aes
from tests.support.hosts import TestHost, TestHosts

# -- commands -------------------------------------------------------------------------------


def test_remote_command_quotes_every_word_and_execs() -> None:
    argv = ["/opt/my venv/bin/python", "-m", "batuta.agent", "--stdio", "--name", "it's"]
    command = remote_command(argv)
    assert command == "exec '/opt/my venv/bin/python' -m batuta.agent --stdio --name 'it'\"'\"'s'"


def test_remote_command_home_relative_python_still_expands() -> None:
    assert remote_command(["~/venv/bin/python", "-V"]) == 'exec "$HOME"/venv/bin/python -V'


def test_env_goes_in_an_env_prefix_and_never_in_the_redacted_form() -> None:
    env = {"OMP_NUM_THREADS": "1", "TOKEN": "s3cr3t value"}
    command = remote_command(["python3", "-m", "batuta.agent"], env)
    assert command == "exec env OMP_NUM_THREADS=1 'TOKEN=s3cr3t value' python3 -m batuta.agent"
    shown = redacted_command(["python3", "-m", "batuta.agent"], env)
    assert "s3cr3t" not in shown and "TOKEN=" in shown and "OMP_NUM_THREADS=" in shown
    with pytest.raises(ValueError, match="environment variable name"):
        remote_command(["python3"], {"BAD NAME": "1"})


def test_asyncssh_command_log_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """asyncssh logs the exec command at INFO; the transport swaps in the redacted form."""
    command = remote_command(["python3"], {"TOKEN": "s3cr3t"})
    caplog.set_level(logging.INFO, logger="asyncssh")
    with ssh._REDACT.hiding(command, redacted_command(["python3"], {"TOKEN": "s3cr3t"})):
        asyncssh.logging.logger.get_child(context="chan=0").info("  Command: %s", command)
    asyncssh.logging.logger.info("  Command: %s", "exec unrelated")  # others untouched
    text = caplog.text
    assert "Command: exec env TOKEN=" in text and "s3cr3t" not in text
    assert "exec unrelated" in text


# -- ProxyJump parsing and option assembly --------------------------------------------------


@pytest.mark.parametrize(
    ("hop", "expected"),
    [
        ("jump", SSHTarget(host="jump", name="jump")),
        ("me@jump", SSHTarget(host="jump", user="me", name="jump")),
        ("me@jump:2222", SSHTarget(host="jump", port=2222, user="me", name="jump")),
        ("[fe80::1]:22", SSHTarget(host="fe80::1", port=22, name="fe80::1")),
    ],
)
def test_split_hop(hop: str, expected: SSHTarget) -> None:
    assert ssh._split_hop(hop) == expected


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_test"
    key.write_private_key(path)
    path.chmod(0o600)
    return path


def test_ssh_config_supplies_alias_user_port_identity_jump_and_known_hosts(tmp_path: Path, client_key: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        textwrap.dedent(
            f"""
            Host node1
                HostName 10.11.0.2
                User alice
                Port 2022
                IdentityFile {client_key}
                ProxyJump bob@gate:2200
                UserKnownHostsFile {tmp_path}/kh_from_config
            """
        )
    )
    settings = SSHSettings(config_files=(config,), connect_timeout=3)
    resolved = ssh._resolve(SSHTarget(host="node1", name="n1"), settings)
    assert (resolved.host, resolved.port, resolved.user) == ("10.11.0.2", 2022, "alice")
    assert resolved.proxy_jump == "bob@gate:2200"
    assert resolved.known_hosts_paths == [f"{tmp_path}/kh_from_config"]
    assert resolved.options.agent_forward_path is None  # agent forwarding off
    assert resolved.options.connect_timeout == 3
    assert len(resolved.options.client_keys or []) == 1

    # the cluster file's own values win over the config, and [ssh] known_hosts over both
    explicit = SSHSettings(config_files=(config,), known_hosts=tmp_path / "kh")
    resolved = ssh._resolve(SSHTarget(host="node1", port=22, user="carol"), explicit)
    assert (resolved.port, resolved.user) == (22, "carol")
    assert resolved.known_hosts_paths == [str(tmp_path / "kh")]


def test_no_config_means_plain_defaults(tmp_path: Path) -> None:
    resolved = ssh._resolve(SSHTarget(host="10.0.0.9"), SSHSettings(config_files=(), known_hosts=tmp_path / "kh"))
    assert (resolved.host, resolved.port, resolved.proxy_jump) == ("10.0.0.9", 22, None)


def test_aes_gcm_goes_first_where_the_cpu_has_aes_and_no_config_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SSHSettings(config_files=(), known_hosts=tmp_path / "kh")
    monkeypatch.setattr(ssh, "_CPU_HAS_AES", True)
    offered = [alg.decode() for alg in ssh._resolve(SSHTarget(host="10.0.0.9"), settings).options.encryption_algs]
    assert offered[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    assert "chacha20-poly1305@openssh.com" in offered  # still offered, after them
    monkeypatch.setattr(ssh, "_CPU_HAS_AES", False)
    offered = [alg.decode() for alg in ssh._resolve(SSHTarget(host="10.0.0.9"), settings).options.encryption_algs]
    assert offered[0] == "chacha20-poly1305@openssh.com"  # asyncssh's own order


def test_a_ciphers_line_in_the_ssh_config_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.write_text("Host box\n  Ciphers aes256-ctr\n")
    monkeypatch.setattr(ssh, "_CPU_HAS_AES", True)
    settings = SSHSettings(config_files=(config,), known_hosts=tmp_path / "kh")
    assert ssh._resolve(SSHTarget(host="box"), settings).options.encryption_algs == [b"aes256-ctr"]


def test_cpu_has_aes_reads_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert cpu_has_aes(info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm\nflags\t\t: fpu aesx\n")
    assert not cpu_has_aes(info)
    assert not cpu_has_aes(tmp_path / "missing")


# -- known_hosts and the host-key policy ----------------------------------------------------


def test_known_hosts_pattern() -> None:
    assert known_hosts_pattern("10.0.0.1", 22) == "10.0.0.1"
    assert known_hosts_pattern("10.0.0.1", 2222) == "[10.0.0.1]:2222"


def test_append_known_host_creates_a_private_file_and_keeps_lines_whole(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    path = tmp_path / "new" / "known_hosts"
    append_known_host(path, "10.0.0.1", 2222, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_text(path.read_text() + "other ssh-ed25519 AAAA")  # no final newline
    append_known_host(path, "10.0.0.2", 22, key)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("[10.0.0.1]:2222 ssh-ed25519 ")
    assert lines[1] == "other ssh-ed25519 AAAA"
    assert lines[2].startswith("10.0.0.2 ssh-ed25519 ")


def test_host_key_policy_unknown_changed_and_trust_on_first_use() -> None:
    old = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    new = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    known = asyncssh.import_known_hosts(f"[10.0.0.1]:2222 {old.export_public_key().decode()}")

    strict = ssh_known_hosts.HostKeyPolicy(known, trust_on_first_use=False)
    assert not strict.validate_host_public_key("10.0.0.2", "10.0.0.2", 2222, new)
    assert strict.verdict == "unknown"

    tofu = ssh_known_hosts.HostKeyPolicy(known, trust_on_first_use=True)
    assert tofu.validate_host_public_key("10.0.0.2", "10.0.0.2", 2222, new)
    assert tofu.learned == ("10.0.0.2", 2222, new)

    changed = ssh_known_hosts.HostKeyPolicy(known, trust_on_first_use=True)
    assert not changed.validate_host_public_key("10.0.0.1", "10.0.0.1", 2222, new)
    assert changed.verdict == "changed" and changed.learned is None


def test_known_hosts_cache_rereads_changed_files_and_skips_bad_lines(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    path = tmp_path / "known_hosts"
    path.write_text("this is not a known_hosts line\n")
    files = ssh_known_hosts.KnownHostsFiles()
    first = files.load([str(path)])
    assert first.match("10.0.0.1", "10.0.0.1", None)[0] == []
    assert files.load([str(path)]) is first  # unchanged: not parsed again
    append_known_host(path, "10.0.0.1", 22, key)
    assert key in files.load([str(path)]).match("10.0.0.1", "10.0.0.1", None)[0]
    assert files.load([str(tmp_path / "missing")]).match("10.0.0.3", "10.0.0.3", None)[0] == []


# -- connect failures without a server ------------------------------------------------------


async def _silent_server() -> tuple[asyncio.Server, int]:
    """A TCP listener that accepts and never says a word (an SSH server that hangs)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_connect_timeout_is_bounded_and_named(tmp_path: Path) -> None:
    server, port = await _silent_server()
    async with server:
        settings = SSHSettings(known_hosts=tmp_path / "kh", config_files=(), connect_timeout=0.3)
        target = SSHTarget(host="127.0.0.1", port=port, user="nobody", name="quiet")
        with pytest.raises(SSHConnectError) as info:
            await asyncio.wait_for(ssh.open_ssh_stream(target, ["cat"], settings), 5)
    message = str(info.value)
    assert f"host quiet (nobody@127.0.0.1:{port})" in message and "within 0.3s" in message


async def test_connection_refused(tmp_path: Path) -> None:
    server, port = await _silent_server()
    server.close()
    await server.wait_closed()
    settings = SSHSettings(known_hosts=tmp_path / "kh", config_files=())
    with pytest.raises(SSHConnectError, match="connection refused"):
        await asyncio.wait_for(ssh.open_ssh_stream(SSHTarget(host="127.0.0.1", port=port), ["cat"], settings), 5)


async def test_a_server_that_hangs_up_at_once_gets_a_hint(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        settings = SSHSettings(known_hosts=tmp_path / "kh", config_files=())
        with pytest.raises(SSHConnectError, match=rf"closed the connection before SSH began; is port {port} an SSH"):
            await asyncio.wait_for(ssh.open_ssh_stream(SSHTarget(host="127.0.0.1", port=port), ["cat"], settings), 5)


def test_errors_are_transport_errors() -> None:
    from batuta.errors import TransportError

    assert issubclass(HostKeyError, TransportError) and issubclass(SSHConnectError, TransportError)
    assert issubclass(ssh.SSHAuthError, SSHConnectError)


# -- against real sshd hosts (tests/support/hosts.py) ---------------------------------------
# Every wait below is bounded: asyncio.timeout around the coroutine, psutil.wait_procs with a
# deadline for remote processes. Nothing sleeps to synchronise.

WAIT_S = 20.0  # generous: a 2-core CI box starting agents and sshds at once


def settings_for(hosts: TestHosts, **changes: object) -> SSHSettings:
    """The run's known_hosts and ssh_config (aliases host0, host1...), as a cluster would name them."""
    base: dict[str, object] = {
        "known_hosts": hosts.known_hosts,
        "config_files": (hosts.ssh_config,),
        "connect_timeout": 5.0,
    }
    base.update(changes)
    return SSHSettings(**base)  # type: ignore[arg-type]


def agent_host(host: TestHost, *, slots: int = 1, env: dict[str, str] | None = None) -> ClusterHost:
    return ClusterHost(
        name=host.name, address=host.name, python=sys.executable, slots=slots, gpus="none", env=env or {}
    )


async def read_exactly(stream: ssh.SSHStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.read()
        if not chunk:
            break
        data += chunk
    return data


def _exited(process: psutil.Process) -> bool:
    """Gone or a zombie: exited. (This sandbox's PID 1 reaps orphans lazily, up to seconds.)"""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def assert_no_processes_left(host: TestHost, before: list[psutil.Process]) -> None:
    """What the session started in the host's namespace has exited (polled, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not all(_exited(p) for p in before) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    alive = [(p.pid, p.name()) for p in before if not _exited(p)]
    assert not alive, alive
    leftover = [(p.pid, p.cmdline()) for p in host.processes() if not _exited(p)]
    assert leftover == [], leftover


async def test_bytes_round_trip_through_a_remote_cat(ssh_hosts: Callable[..., TestHosts]) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    target = SSHTarget(host=host.address, port=host.port, user=host.user, identity_file=hosts.identity_file)
    async with asyncio.timeout(WAIT_S):
        stream = await ssh.open_ssh_stream(target, ["cat"], settings_for(hosts, config_files=()))
        assert stream.description == f"ssh root@{host.address}:22"
        payload = os.urandom(3 * 1024 * 1024 + 17)  # beyond the channel window: drain must wait
        reader = asyncio.create_task(read_exactly(stream, len(payload)))
        for offset in range(0, len(payload), 256 * 1024):
            stream.write(payload[offset : offset + 256 * 1024])
            await stream.drain()
        assert await reader == payload
        started = host.processes()
        assert [p.name() for p in started] == ["cat"]  # the login shell exec'd it
        await stream.close(timeout=5)
    assert stream.exit_status == 0
    await assert_no_processes_left(host, started)


async def test_config_alias_env_prefix_and_stderr_to_logs(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture
) -> None:
    """The alias brings HostName, User, IdentityFile; env reaches the command but no log."""
    hosts = ssh_hosts(1)
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-value-4711"
    argv = ["sh", "-c", 'printf "%s" "$BATUTA_TEST_VALUE"; echo "to stderr" >&2']
    async with asyncio.timeout(WAIT_S):
        stream = await ssh.open_ssh_stream(
            SSHTarget(host="host0", name="n0"), argv, settings_for(hosts), env={"BATUTA_TEST_VALUE": secret}
        )
        assert await read_exactly(stream, len(secret)) == secret.encode()
        assert await stream.read() == b""
        await stream.close(timeout=5)
    assert stream.exit_status == 0
    assert f"root@{hosts[0].address}:22" in stream.description
    assert "n0 agent: to stderr" in caplog.text
    assert "BATUTA_TEST_VALUE=" in caplog.text  # the redacted command is logged...
    assert secret not in caplog.text  # ...its value never, by us or by asyncssh


async def test_agent_over_ssh_runs_a_pool_task_and_leaves_nothing(ssh_hosts: Callable[..., TestHosts]) -> None:
    hosts = ssh_hosts(2)
    settings = settings_for(hosts)
    specs = [ssh_host(agent_host(h, slots=1, env={"OMP_NUM_THREADS": "1"}), settings) for h in hosts]
    async with asyncio.timeout(WAIT_S):
        async with Pool(specs, PoolConfig()) as pool:
            assert pool.slot_count == 2
            result = await pool.run(Task.kernel("noop", 1))
            assert result.status is TaskStatus.SUCCEEDED, result
            assert result.value == 1 and result.host in ("host0", "host1")
            # arrays out of band in frames: below, at and above where writes stop being joined
            # (64 KiB), up to where they stream (32 MiB): each went to the channel as an array
            for n in (1_000, 8_192, 9_000, 1 << 20):
                a = np.arange(n, dtype=np.float64)
                summed = await asyncio.wait_for(pool.run(Task.kernel("vadd", a, a)), 60)
                assert summed.status is TaskStatus.SUCCEEDED, (n, summed)
                np.testing.assert_array_equal(summed.value, 2 * a)
            views = {v.name: v for v in pool.hosts()}
            assert views["host0"].description.startswith("ssh root@")
            started = {h.name: h.processes() for h in hosts}
            assert all(any("batuta.agent" in " ".join(p.cmdline()) for p in procs) for procs in started.values())
    for host in hosts:
        await assert_no_processes_left(host, started[host.name])


async def test_cluster_file_end_to_end(ssh_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    hosts = ssh_hosts(2)
    path = tmp_path / "cluster.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [defaults]
            python = "{sys.executable}"
            slots = 1
            gpus = "none"

            [[hosts]]
            address = "host0"

            [[hosts]]
            name = "second"
            address = "{hosts[1].address}"
            user = "root"
            identity_file = "{hosts.identity_file}"

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"
            connect_timeout = 5

            [pool]
            heartbeat_interval = 0.5
            """
        )
    )
    cluster = load_cluster(path)
    async with asyncio.timeout(WAIT_S):
        async with build_pool(cluster) as pool:
            assert {v.name for v in pool.hosts()} == {"host0", "second"}
            values = await pool.map("noop", [(i,) for i in range(20)])
    assert sorted(values) == list(range(20))


async def test_a_host_with_another_batuta_is_retired_at_once_naming_itself_once(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path
) -> None:
    """It was relaunched with backoff for 2.5 minutes (a relaunch meets the same batuta), shown
    as "unreachable" though it answered, its reason "host host1: host host1 runs batuta ..."."""
    hosts = ssh_hosts(2)
    old = tmp_path / "python-old-batuta"  # started as "<this> -P -m batuta.agent ARGS"
    old.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            while [ $# -gt 0 ] && [ "$1" != batuta.agent ]; do shift; done
            shift
            exec {sys.executable} -c 'import runpy, batuta._version as v; v.__version__ = "0.0.9"; \\
            runpy.run_module("batuta.agent", run_name="__main__", alter_sys=True)' "$@"
            """
        )
    )
    old.chmod(0o755)
    path = tmp_path / "cluster.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [defaults]
            python = "{sys.executable}"
            slots = 1
            gpus = "none"

            [[hosts]]
            address = "host0"

            [[hosts]]
            address = "host1"
            python = "{old}"

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"

            [pool]
            start_wait = inf
            """
        )
    )
    changes: list[HostStateChanged] = []
    pool = build_pool(load_cluster(path))
    pool.subscribe(lambda e: changes.append(e) if isinstance(e, HostStateChanged) and e.host == "host1" else None)
    async with asyncio.timeout(WAIT_S):
        async with pool:  # start_wait = inf: started once each host is up or has failed
            states = {v.name: v.state for v in pool.hosts()}
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
    assert states == {"host0": "up", "host1": "retired"}
    assert [e.state for e in changes][:1] == ["retired"]  # never "unreachable", never relaunched
    reason = changes[0].reason
    assert reason.startswith("host host1: its agent runs batuta 0.0.9, the coordinator") and reason.count("host1") == 1
    assert f"put this batuta there with `batuta cluster install --cluster {path}`" in reason  # not "FILE"


async def test_unknown_host_key_is_refused_with_the_fix(ssh_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    target = SSHTarget(host=host.address, user="root", identity_file=hosts.identity_file, name="fresh")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(HostKeyError) as info:
            await ssh.open_ssh_stream(target, ["true"], settings_for(hosts, known_hosts=empty, config_files=()))
    error = info.value
    assert not error.changed
    message = str(error)
    assert f"host fresh ({host.address}:22): unknown host key SHA256:" in message
    assert f"`ssh-keyscan -p 22 {host.address} >> {empty}`" in message
    assert "trust_on_first_use = true" in message
    assert empty.read_text() == ""  # nothing recorded
    assert host.processes() == []


async def test_changed_host_key_is_refused_even_with_trust_on_first_use(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    host.regenerate_host_key()  # known_hosts still has the old key
    before = hosts.known_hosts.read_text()
    settings = settings_for(hosts, trust_on_first_use=True)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(HostKeyError) as info:
            await ssh.open_ssh_stream(SSHTarget(host="host0"), ["true"], settings)
    assert info.value.changed
    message = str(info.value)
    assert "HOST KEY CHANGED" in message and "trust_on_first_use never accepts a changed key" in message
    assert "ssh-keygen -R" in message
    assert hosts.known_hosts.read_text() == before
    assert host.processes() == []


async def test_cluster_status_names_why_a_host_is_not_up(ssh_hosts: Callable[..., TestHosts], client_key: Path) -> None:
    """A changed host key or a refused login is not "unreachable" (a network fault, with the
    wrong fix), nor is a host reached whose python cannot run the agent."""
    from batuta.runtime.probe import probe_hosts

    hosts = ssh_hosts(3)
    hosts[1].regenerate_host_key()  # known_hosts still has the old key
    settings = settings_for(hosts)

    def host(name: str, address: str, **given: Any) -> ClusterHost:
        return ClusterHost(
            name=name, address=address, python=given.pop("python", sys.executable), slots=1, gpus="none", **given
        )

    specs = [
        ssh_host(host("fine", "host0"), settings),
        ssh_host(host("rekeyed", "host1"), settings),
        ssh_host(host("nopython", "host2", python="/nonexistent/bin/python"), settings),
        ssh_host(
            host("wrongkey", hosts[2].address, user="root", identity_file=client_key),
            settings_for(hosts, config_files=()),
        ),
    ]
    async with asyncio.timeout(WAIT_S):
        reports = await probe_hosts(specs, timeout=10)
    assert [(r.name, r.state) for r in reports] == [
        ("fine", "up"),
        ("rekeyed", "refused"),
        ("nopython", "unusable"),
        ("wrongkey", "refused"),
    ]
    assert "HOST KEY CHANGED" in (reports[1].error or "")


async def test_trust_on_first_use_records_the_key(ssh_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its folder exists yet
    target = SSHTarget(host=host.address, user="root", identity_file=hosts.identity_file)
    async with asyncio.timeout(WAIT_S):
        tofu = settings_for(hosts, known_hosts=known, config_files=(), trust_on_first_use=True)
        stream = await ssh.open_ssh_stream(target, ["true"], tofu)
        await stream.close(timeout=5)
        key_type, key_data = host.host_public_key.split()[:2]
        assert known.read_text() == f"{host.address} {key_type} {key_data}\n"
        # recorded: from now on the key is known, with or without trust-on-first-use
        strict = settings_for(hosts, known_hosts=known, config_files=())
        stream = await ssh.open_ssh_stream(target, ["true"], strict)
        await stream.close(timeout=5)
    assert known.read_text().count("\n") == 1


async def test_proxy_jump_from_the_ssh_config(ssh_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    """`ProxyJump host0` in the config: a second connection tunnelled through the first.

    The namespaces only reach their own /30, so the jump host forwards to its own address;
    both hops are checked against the same known_hosts under the same policy.
    """
    hosts = ssh_hosts(1)
    host = hosts[0]
    config = tmp_path / "ssh_config"
    config.write_text(
        textwrap.dedent(
            f"""
            Host jumped
                HostName {host.address}
                User root
                IdentityFile {hosts.identity_file}
                ProxyJump host0
            """
        )
    )
    settings = settings_for(hosts, config_files=(config, hosts.ssh_config))
    async with asyncio.timeout(WAIT_S):
        stream = await ssh.open_ssh_stream(SSHTarget(host="jumped"), ["cat"], settings)
        assert stream.description == f"ssh root@{host.address}:22 via 1 jump host"
        stream.write(b"through the jump host")
        await stream.drain()
        assert await read_exactly(stream, 21) == b"through the jump host"
        sessions = [p for p in host.processes(include_sshd=True) if p.pid != host.sshd_pid]
        await stream.close(timeout=5)
    assert len(sessions) >= 3  # two sshd sessions (jump, target) and the cat


async def test_kill_abandons_the_link_and_the_remote_side_exits(ssh_hosts: Callable[..., TestHosts]) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    async with asyncio.timeout(WAIT_S):
        stream = await ssh.open_ssh_stream(SSHTarget(host="host0"), ["cat"], settings_for(hosts))
        stream.write(b"ping")
        assert await read_exactly(stream, 4) == b"ping"  # cat runs: the shell has exec'd it
        started = host.processes()
        assert [p.name() for p in started] == ["cat"]
        stream.kill()
        assert await stream.read() == b""
        with pytest.raises(StreamClosedError):
            stream.write(b"x")
            await stream.drain()
    await assert_no_processes_left(host, started)


async def test_a_killed_sshd_session_is_named_as_the_connection_not_the_agent(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    """`kill -9` of the host's `sshd: root@notty` loses the host because its SSH connection
    closed; the agent did nothing, so the reason must not say it closed the stream."""
    hosts = ssh_hosts(1)
    host = hosts[0]
    spec = ssh_host(agent_host(host, slots=1, env={"OMP_NUM_THREADS": "1"}), settings_for(hosts))
    downs: list[str] = []
    down = asyncio.Event()

    def on_event(event: object) -> None:
        if isinstance(event, HostDown):
            downs.append(event.reason)
            down.set()

    async with asyncio.timeout(WAIT_S):
        async with Pool([spec], PoolConfig()) as pool:
            pool.subscribe(on_event)
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
            [session] = [p for p in host.processes(include_sshd=True) if p.name() == "sshd" and p.pid != host.sshd_pid]
            session.kill()
            await down.wait()
    assert downs[0] == (
        f"the SSH connection (ssh root@{host.address}:22) closed with no exit status for the agent: "
        "its sshd session on the host ended or the network dropped it"
    )


async def test_cut_link_times_out_within_connect_timeout(ssh_hosts: Callable[..., TestHosts]) -> None:
    hosts = ssh_hosts(1)
    hosts[0].cut_link()
    settings = settings_for(hosts, connect_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SSHConnectError, match=r"host host0 \(root@.*:22\): no SSH session within 0.5s"):
            await ssh.open_ssh_stream(SSHTarget(host="host0"), ["true"], settings)
    assert loop.time() - started < 3.0


async def test_wrong_key_is_an_auth_error(ssh_hosts: Callable[..., TestHosts], client_key: Path) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    target = SSHTarget(host=host.address, user="root", identity_file=client_key, name="h")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ssh.SSHAuthError, match=r"host h \(root@.*:22\): permission denied"):
            await ssh.open_ssh_stream(target, ["true"], settings_for(hosts, config_files=()))


async def test_missing_remote_python_fails_fast_with_the_shell_message(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture
) -> None:
    hosts = ssh_hosts(1)
    host = ClusterHost(name="h0", address="host0", python="/nonexistent/bin/python", slots=1, gpus="none")
    spec = ssh_host(host, settings_for(hosts))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(AgentError, match=r"host h0: agent exited before saying hello: .*/nonexistent/bin/python"):
            await Pool([spec], PoolConfig(start_timeout=10)).start()  # the shell's own words, in the error
    assert "h0 agent:" in caplog.text and "/nonexistent/bin/python" in caplog.text  # and in the log


async def test_endless_stderr_line_does_not_stall_the_stream(
    ssh_hosts: Callable[..., TestHosts], caplog: pytest.LogCaptureFixture
) -> None:
    """stdout and stderr share the channel window: stderr is drained even without newlines."""
    hosts = ssh_hosts(1)
    caplog.set_level(logging.ERROR, logger="batuta.transport.ssh")  # 3 MB of 'a' need not be kept
    argv = ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a >&2; echo done"]
    async with asyncio.timeout(WAIT_S):
        stream = await ssh.open_ssh_stream(SSHTarget(host="host0"), argv, settings_for(hosts))
        assert await read_exactly(stream, 5) == b"done\n"
        await stream.close(timeout=5)
