"""Key material and OpenSSH configuration for the test hosts, and the wait for sshd's banner.

Per run, in a fresh temp dir ``batuta-hosts-<pid>-*``: one client ed25519 key (``identity_file``,
0600, also the only line of ``authorized_keys``), one ed25519 host key per host, ``known_hosts``
with every host's key (under its alias and its address) and ``ssh_config`` with a ``Host`` alias
per host (``host0``, ``host1``, ...: HostName, User root, Port, IdentityFile, UserKnownHostsFile,
``StrictHostKeyChecking yes``). Keys come from ``cryptography`` in process (microseconds each).

It is separate from the namespace plumbing (`tests.support.netns`) and the host objects
(`tests.support.host`, `tests.support.hosts`) because it is the OpenSSH side: what sshd and the
clients read, written from the run's state, and nothing here touches the network set-up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.netns import POLL_S

if TYPE_CHECKING:
    from tests.support.host import TestHost
    from tests.support.hosts import TestHosts

SSH_PORT = 22
SSH_USER = "root"
PRIVSEP_DIR = Path("/run/sshd")
PROBE_TIMEOUT_S = 0.25


# --------------------------------------------------------------------------- keys and files


def ed25519(comment: str) -> tuple[bytes, str]:
    """(OpenSSH private key bytes, public key line) for a fresh ed25519 key."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}"


def write_file(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) with ``mode`` from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def check_token(value: str, what: str) -> str:
    if not value or any(c in value for c in ' \t\n"\\#'):
        raise ValueError(f"{what} must be one sshd_config token without spaces, quotes or '#': {value!r}")
    return value


def wait_banner(address: str, port: int, deadline: float, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    """Poll a TCP connect to address:port until an SSH banner comes back (bounded)."""
    last: Exception | None = None
    for _ in range(int(max(0.0, deadline - time.monotonic()) / POLL_S) + 2):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: sshd exited with {proc.returncode} before it was ready")
        try:
            with socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S) as sock:
                if sock.recv(8).startswith(b"SSH-"):
                    return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise TimeoutError(f"{what}: {address}:{port} not answering SSH ({last})")


def sshd_config(run: TestHosts, host: TestHost) -> str:
    # Each host its own cache folder (where agents keep the user's shipped code), unless the
    # run says otherwise: the hosts share this machine's file system, and must not share that.
    env = {"XDG_CACHE_HOME": str(host.dir / "cache"), **run.env}
    setenv = " ".join(f'"{k}={v}"' for k, v in env.items())
    return f"""\
# batuta test host {host.name} ({host.netns}), run {run.run_id}; written by tests/support/hosts.py
ListenAddress {host.address}
Port {host.port}
AddressFamily inet
HostKey {host.host_key_file}
PidFile {host.sshd_pid_file}
AuthorizedKeysFile {run.authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
# PAM on: without it OpenSSH refuses even key logins for an account whose password is
# locked ('!' in /etc/shadow), which is how many fresh images ship root.
UsePAM yes
StrictModes no
AllowAgentForwarding no
X11Forwarding no
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
UseDNS no
LoginGraceTime 30
MaxStartups 256
MaxSessions 64
LogLevel INFO
Subsystem sftp internal-sftp
# No AcceptEnv: clients cannot set variables. SetEnv gives sessions the tests' PATH and a cache folder.
SetEnv {setenv}
"""


def ssh_config_stanza(run: TestHosts, host: TestHost) -> str:
    return f"""\
Host {host.name}
    HostName {host.address}
    User {host.user}
    Port {host.port}
    IdentityFile {run.identity_file}
    IdentitiesOnly yes
    UserKnownHostsFile {run.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    ForwardAgent no
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR

"""
