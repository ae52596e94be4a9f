"""Encrypted identity files, as OpenSSH's `ssh -i` handles them: ssh-agent's copy, a terminal prompt, or a clear error.

The integration tests run a real `ssh-agent` (started and killed by PID, its socket in
tmp_path; keys added with `ssh-add`, the passphrase coming from an SSH_ASKPASS script in
tmp_path, never from argv) against real sshd hosts from `tests/support/hosts.py`. The
terminal prompt is tested on a real pseudo-terminal in a child process; where a test needs
"a terminal" or "no terminal" in this process, it replaces `ssh_keys.ask_terminal`, so a
developer running the tests at a terminal is never prompted. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from batuta.core.task import Task
from batuta.runtime.cluster import build_pool, load_cluster
from batuta.transport import ssh, ssh_keys
from batuta.transport.ssh import SSHAuthError, SSHKeyLockedError, SSHSettings, SSHTarget
from tests.support.hosts import TestHosts

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0
PASSPHRASE = "correct horse 42"


def _encrypted_copy(source: Path, destination: Path, *, fmt: str = "openssh", pub: bool = False) -> Path:
    """`source`'s key, encrypted with PASSPHRASE (the same public key, so the hosts accept it)."""
    key = asyncssh.read_private_key(source)
    key.write_private_key(destination, format_name=fmt, passphrase=PASSPHRASE)
    destination.chmod(0o600)
    if pub:
        key.write_public_key(f"{destination}.pub")
    return destination


@pytest.fixture
def plain_key(tmp_path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_plain"
    key.write_private_key(path)
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def no_unlocked_keys() -> Iterator[None]:
    """Each test starts with no key unlocked in this process."""
    ssh_keys._UNLOCKED.clear()
    yield
    ssh_keys._UNLOCKED.clear()


def _no_terminal(prompt: str) -> str | None:
    return None


# -- what is in a key file ----------------------------------------------------------------


def test_encrypted_identity_finds_the_public_key_as_openssh_does(tmp_path: Path, plain_key: Path) -> None:
    assert ssh_keys.encrypted_identity(plain_key) is None  # not encrypted
    public = asyncssh.read_private_key(plain_key).convert_to_public()
    header_only = ssh_keys.encrypted_identity(_encrypted_copy(plain_key, tmp_path / "a"))
    assert header_only is not None and header_only.public_key == public  # OpenSSH format: cleartext header
    beside = ssh_keys.encrypted_identity(_encrypted_copy(plain_key, tmp_path / "b", fmt="pkcs8-pem", pub=True))
    assert beside is not None and beside.public_key == public  # PKCS#8: from b.pub
    unknown = ssh_keys.encrypted_identity(_encrypted_copy(plain_key, tmp_path / "c", fmt="pkcs8-pem"))
    assert unknown is not None and unknown.public_key is None
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(asyncssh.KeyImportError):
        ssh_keys.encrypted_identity(tmp_path / "junk")


def _run_in_session(code: str, *, terminal: bool, typed: bytes = b"") -> str:
    """Run `code` in a new session: on a fresh pseudo-terminal as its controlling terminal
    (`setsid --ctty`), typing `typed` once the prompt shows; or with no terminal at all."""
    argv = [sys.executable, "-c", code]
    if not terminal:
        out = subprocess.run(
            ["setsid", *argv], stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT_S, cwd=REPO_ROOT
        )
        return out.stdout.decode()
    master, slave = pty.openpty()
    proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave, stdout=slave, stderr=slave, cwd=REPO_ROOT)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if typed and b"pw: " in seen:
                os.write(master, typed)
                typed = b""
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT_S)
        os.close(master)
    return seen.decode(errors="replace")


def test_ask_terminal_reads_the_controlling_terminal_without_echo_and_nothing_else() -> None:
    code = "from batuta.transport.ssh_keys import ask_terminal; print('got', repr(ask_terminal('pw: ')), flush=True)"
    shown = _run_in_session(code, terminal=True, typed=b"s3cret words\n")
    assert "got 's3cret words'" in shown, shown
    assert shown.count("s3cret") == 1, shown  # not echoed as typed
    assert _run_in_session(code, terminal=False).strip() == "got None"  # no terminal: not stdin either


# -- against real sshd hosts ----------------------------------------------------------------


class Agent:
    """A real ssh-agent in the foreground (-D), its socket in a test folder."""

    def __init__(self, folder: Path) -> None:
        self.socket = folder / "agent.sock"
        self.folder = folder
        self.process = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(self.socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + WAIT_S
        while not self.socket.exists():  # polls the agent's own readiness, bounded
            assert self.process.poll() is None, f"ssh-agent exited with {self.process.returncode}"
            assert time.monotonic() < deadline, "ssh-agent did not create its socket"
            time.sleep(0.01)

    def add(self, key: Path) -> None:
        """`ssh-add KEY`; the passphrase comes from an askpass script, not from argv."""
        askpass = self.folder / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' '{PASSPHRASE}'\n")
        askpass.chmod(0o700)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SSH_AUTH_SOCK": str(self.socket),
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
        }
        out = subprocess.run(
            ["ssh-add", str(key)], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT_S
        )
        assert out.returncode == 0, out.stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=WAIT_S)


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[Callable[[], Agent]]:
    started: list[Agent] = []

    def start() -> Agent:
        folder = tmp_path / f"agent{len(started)}"
        folder.mkdir(mode=0o700)
        started.append(Agent(folder))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()


def _settings(hosts: TestHosts, *, ask_passphrase: bool = True) -> SSHSettings:
    return SSHSettings(
        known_hosts=hosts.known_hosts, config_files=(), connect_timeout=5.0, ask_passphrase=ask_passphrase
    )


async def test_an_encrypted_identity_file_signs_with_ssh_agents_copy(
    ssh_hosts: Callable[..., TestHosts],
    ssh_agent: Callable[[], Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: the key is in ssh-agent, the cluster file names the encrypted file."""
    hosts = ssh_hosts(1)
    host = hosts[0]
    key = _encrypted_copy(hosts.identity_file, tmp_path / "id_locked")  # no .pub beside it
    agent = ssh_agent()
    agent.add(key)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.socket))
    monkeypatch.setattr(ssh_keys, "ask_terminal", lambda prompt: pytest.fail("asked for a passphrase"))
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        textwrap.dedent(
            f"""
            [[hosts]]
            name = "locked"
            address = "{host.address}"
            user = "root"
            identity_file = "{key}"
            python = "{sys.executable}"
            slots = 1
            gpus = "none"

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = false
            connect_timeout = 5
            """
        )
    )
    async with asyncio.timeout(WAIT_S):
        async with build_pool(load_cluster(cluster)) as pool:
            result = await pool.run(Task.kernel("noop", 7))
    assert result.value == 7 and result.host == "locked"


async def test_an_encrypted_identity_file_without_an_agent_is_a_clear_error(
    ssh_hosts: Callable[..., TestHosts],
    ssh_agent: Callable[[], Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    plain_key: Path,
) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    key = _encrypted_copy(hosts.identity_file, tmp_path / "id_locked")
    target = SSHTarget(host=host.address, user="root", identity_file=key, name="h")
    monkeypatch.setattr(ssh_keys, "ask_terminal", _no_terminal)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SSHKeyLockedError) as no_agent:
            await ssh.open_ssh_stream(target, ["true"], _settings(hosts))
        agent = ssh_agent()  # running, but holding another key
        agent.add(plain_key)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.socket))
        with pytest.raises(SSHKeyLockedError) as other_key:
            await ssh.open_ssh_stream(target, ["true"], _settings(hosts))
    message = str(no_agent.value)
    assert message == (
        f"host h: identity file {key} is encrypted and no ssh-agent is running (SSH_AUTH_SOCK is not set); "
        f"load it with `ssh-add {key}` (batuta asks for a passphrase only on a terminal, never from "
        "arguments or the environment)"
    )
    assert not no_agent.value.retryable  # the pool retires the host instead of retrying it
    assert f"identity file {key} is encrypted and ssh-agent does not hold it; load it with `ssh-add {key}`" in str(
        other_key.value
    )
    assert host.processes() == []


async def test_an_encrypted_key_named_by_the_ssh_config_is_named_with_the_fix_not_called_a_refused_key(
    ssh_hosts: Callable[..., TestHosts],
    ssh_agent: Callable[[], Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ~/.ssh/config alias whose IdentityFile is encrypted, with no ssh-agent: the login was
    refused with "check ... authorized_keys", though the key was never offered. With the
    agent holding it, the same alias logs in."""
    hosts = ssh_hosts(1)
    host = hosts[0]
    key = _encrypted_copy(hosts.identity_file, tmp_path / "id_locked", pub=True)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host gpu-a\n    HostName {host.address}\n    User root\n    IdentityFile {key}\n")
    settings = SSHSettings(known_hosts=hosts.known_hosts, config_files=(config,), connect_timeout=5.0)
    monkeypatch.setattr(ssh_keys, "ask_terminal", lambda prompt: pytest.fail("asked for a passphrase"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    target = SSHTarget(host="gpu-a")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SSHKeyLockedError) as locked:
            await ssh.open_ssh_stream(target, ["true"], settings)
        agent = ssh_agent()
        agent.add(key)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.socket))
        stream = await ssh.open_ssh_stream(target, ["true"], settings)
        await stream.close(timeout=5)
    message = str(locked.value)
    assert message.startswith(f"host gpu-a (root@{host.address}:22): permission denied: its key {key} ")
    assert "is encrypted and no ssh-agent is running (SSH_AUTH_SOCK is not set)" in message
    assert f"load it with `ssh-add {key}`" in message
    assert "authorized_keys" not in message
    assert stream.exit_status == 0


async def test_an_encrypted_identity_file_asks_on_the_terminal_once_per_process(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = ssh_hosts(1)
    host = hosts[0]
    key = _encrypted_copy(hosts.identity_file, tmp_path / "id_locked")
    answers = ["wrong guess", PASSPHRASE]
    prompts: list[str] = []

    def terminal(prompt: str) -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setattr(ssh_keys, "ask_terminal", terminal)
    target = SSHTarget(host=host.address, user="root", identity_file=key, name="h")
    async with asyncio.timeout(WAIT_S):
        for _ in range(2):  # the second connection (another host, a reconnect) does not ask again
            stream = await ssh.open_ssh_stream(target, ["true"], _settings(hosts))
            await stream.close(timeout=5)
            assert stream.exit_status == 0
    assert prompts == [f"Enter passphrase for key '{key}' (host h): "] * 2  # the wrong one, then the right one
    ssh_keys._UNLOCKED.clear()
    monkeypatch.setattr(ssh_keys, "ask_terminal", lambda prompt: "wrong again")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(SSHAuthError, match=rf"host h: wrong passphrase for {key} \(3 tries\)"):
            await ssh.open_ssh_stream(target, ["true"], _settings(hosts))
        with pytest.raises(SSHKeyLockedError, match="ssh-add"):  # a full-screen app asks nothing
            await ssh.open_ssh_stream(target, ["true"], _settings(hosts, ask_passphrase=False))


def test_the_dashboard_never_prompts_for_a_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`batuta tui` owns the terminal, so its SSH hosts get `ask_passphrase=False`."""
    import batuta.jobs
    import batuta.jobs._run as job_run
    from batuta.cli import main
    from batuta.errors import BatutaError
    from batuta.runtime.cluster import ClusterConfig

    seen: list[ClusterConfig] = []

    def make_pool(**options: object) -> None:
        assert isinstance(options["cluster"], ClusterConfig)
        seen.append(options["cluster"])
        raise BatutaError("stop here")

    # `batuta.jobs` exports it lazily and keeps what it first hands out: patch that name too,
    # first, so that what the undo puts back is the real one
    monkeypatch.setattr(batuta.jobs, "make_pool", make_pool)
    monkeypatch.setattr(job_run, "make_pool", make_pool)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[hosts]]\naddress = "10.0.0.1"\nidentity_file = "id_locked"\n')
    assert main(["tui", "--cluster", str(cluster)]) == 1
    (config,) = seen
    assert config.ssh.ask_passphrase is False
