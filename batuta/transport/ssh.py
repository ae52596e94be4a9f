"""SSH transport: one asyncssh connection and one channel per host, running the host agent.

The agent is started with `exec` as the channel's command, without a terminal, so its
stdin/stdout are the framed byte stream and its stderr lines land in our logs. Closing the
channel is the agent's EOF; no port is ever opened on the worker.

Host keys are checked against known_hosts (the `[ssh] known_hosts` path, the ssh config's
`UserKnownHostsFile`, or `~/.ssh/known_hosts`). A changed key is always refused. An
unknown key is refused unless `trust_on_first_use` is on, in which case it is accepted and
appended to the first known_hosts file once the connection is up. `~/.ssh/config` (or the
files named in `SSHSettings.config_files`) supplies aliases, users, ports, identity files,
`ProxyJump` and `ProxyCommand`. Jump hosts are connected here, hop by hop, under the same
host-key policy and timeout, rather than by asyncssh's own tunnel code (which would check
them against other known_hosts and skip trust-on-first-use). Agent forwarding is off.

An `identity_file` whose key is encrypted is handled as OpenSSH handles `ssh -i`: if
ssh-agent (`SSH_AUTH_SOCK`, or the config's `IdentityAgent`) holds the same key (matched by
its public key, from `PATH.pub` or the key file's own cleartext header), the agent's copy
signs and the file is never decrypted. Otherwise the passphrase is asked for on the
controlling terminal (never taken from argv or the environment), once per key and process;
with no terminal, the connection fails with a one-line error saying to `ssh-add` the key.

Extra environment for the agent travels as an `env KEY=VALUE` prefix of the remote command:
OpenSSH servers silently drop `env` requests for names outside `AcceptEnv`, and there is
no reply to tell us. Values therefore pass through the remote shell's argv for an instant
(the shell `exec`s `env`, which `exec`s Python) and are never written to our logs, ours or
asyncssh's. They are not a place for secrets.

asyncssh is imported here, in `ssh_keys` (encrypted identity files), `ssh_known_hosts` and
`ssh_exec` (commands and SFTP copies for `batuta cluster install`) and nowhere else; its errors
become `SSHError` subclasses at this edge. The settings, targets and those errors live in
`ssh_settings`, so that reading a cluster file and starting local hosts never import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import shlex
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh
from asyncssh.encryption import get_default_encryption_algs

from batuta.transport.base import (
    Buffer,
    StderrTail,
    StreamClosedError,
    coalesced,
    describe_exit,
    log_stderr_line,
)
from batuta.transport.ssh_ciphers import cpu_has_aes, preferred_ciphers
from batuta.transport.ssh_keys import (
    DEFAULT_IDENTITY_FILES,
    EncryptedIdentity,
    PassphraseRefused,
    agent_holds,
    encrypted_among,
    encrypted_identity,
    unlock_on_terminal,
)
from batuta.transport.ssh_known_hosts import (
    KNOWN_HOSTS,
    HostKeyPolicy,
    append_known_host,
    known_hosts_pattern,
)
from batuta.transport.ssh_settings import (
    HostKeyError,
    SSHAuthError,
    SSHConnectError,
    SSHError,
    SSHKeyLockedError,
    SSHSettings,
    SSHSettingsError,
    SSHTarget,
)

log = logging.getLogger("batuta.transport.ssh")

READ_CHUNK = 256 * 1024
STDERR_CHUNK = 64 * 1024
MAX_JUMP_DEPTH = 8
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CPU_HAS_AES = cpu_has_aes()


# -- the stream ---------------------------------------------------------------------------


class SSHStream:
    """A `ByteStream` over one SSH channel whose command is the host agent."""

    def __init__(
        self,
        *,
        conn: asyncssh.SSHClientConnection,
        process: asyncssh.SSHClientProcess[bytes],
        jumps: Sequence[asyncssh.SSHClientConnection],
        description: str,
        stderr_task: asyncio.Task[None],
        stderr_tail: StderrTail,
    ) -> None:
        self._conn = conn
        self._stderr_tail = stderr_tail
        self._process = process
        self._jumps = list(jumps)
        self._description = description
        self._stderr_task = stderr_task
        self._stdin = process.stdin
        self._stdout = process.stdout

    @property
    def description(self) -> str:
        return self._description

    @property
    def local_address(self) -> str | None:  # ours on the host's connection (None behind jump hosts: the hop's)
        sockname = None if self._jumps else self._conn.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    @property
    def exit_status(self) -> int | None:
        """The remote command's exit status once it has exited (None before, or if unknown)."""
        return self._process.exit_status

    async def read(self) -> bytes:
        try:
            return await self._stdout.read(READ_CHUNK)
        except (asyncssh.Error, OSError):
            return b""

    def write(self, data: bytes) -> None:
        self._write(data)

    def _write(self, data: Buffer) -> None:
        if self._stdin.is_closing():
            raise StreamClosedError(f"{self._description}: stream closed")
        try:
            self._stdin.write(cast(bytes, data))  # asyncssh copies any buffer into its own bytearray
        except (asyncssh.Error, OSError) as exc:
            raise StreamClosedError(f"{self._description}: {exc}") from exc

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        for data in coalesced(parts):  # the channel copies each write into its own buffer: no join first
            self._write(data)

    async def how_it_ended(self, timeout: float) -> str:
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(self._process.wait_closed(), timeout)
        killed = self._process.exit_signal  # (name, core dumped, message, language), as sshd said
        if killed is not None:
            name = str(killed[0]).upper()
            number = getattr(signal.Signals, f"SIG{name}", None)
            return describe_exit(-int(number)) if number is not None else f"killed by SIG{name}"
        status = self._process.exit_status
        if status is not None and status >= 0:
            return describe_exit(status)
        if any(conn.is_closed() for conn in [self._conn, *self._jumps]):
            # sshd reports the command's exit before it closes the channel; a connection that
            # closed with no such report lost its session process (killed, or the network dropped
            # it), not the agent, which at most sees EOF on its stdin after that
            return (
                f"the SSH connection ({self._description}) closed with no exit status for the agent: "
                "its sshd session on the host ended or the network dropped it"
            )
        return ""

    async def last_words(self, timeout: float) -> str:
        return await self._stderr_tail.last(timeout)

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise StreamClosedError(f"{self._description}: {exc}") from exc

    async def close(self, timeout: float = 2.0) -> None:
        """EOF to the agent, wait up to `timeout` for it to exit, then TERM, then drop the link."""
        with contextlib.suppress(Exception):
            if not self._stdin.is_closing():
                self._stdin.write_eof()
        if not await _wait(self._process.wait_closed(), timeout):
            with contextlib.suppress(Exception):
                self._process.terminate()  # a "signal" request; servers may ignore it
            if not await _wait(self._process.wait_closed(), min(timeout, 1.0)):
                with contextlib.suppress(Exception):
                    self._process.close()
        for conn in [self._conn, *reversed(self._jumps)]:
            with contextlib.suppress(Exception):
                conn.close()
            if not await _wait(conn.wait_closed(), timeout):
                with contextlib.suppress(Exception):
                    conn.abort()
        await _wait(self._stderr_task, timeout)

    def kill(self) -> None:
        """Drop the connection now; sshd then closes the agent's stdin, so it exits on EOF."""
        for conn in [self._conn, *self._jumps]:
            with contextlib.suppress(Exception):
                conn.abort()


async def _wait(awaitable: Any, timeout: float) -> bool:
    """Await with a bound; True if it finished (successfully or not) in time."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        return False
    except Exception:
        return True
    return True


async def _forward_stderr(reader: asyncssh.SSHReader[bytes], prefix: str, tail: StderrTail) -> None:
    try:
        await _forward_chunks(reader, prefix, tail)
    finally:
        tail.ended.set()


async def _forward_chunks(reader: asyncssh.SSHReader[bytes], prefix: str, tail: StderrTail) -> None:
    """Each line the agent writes to stderr goes to our logs; ends at EOF or on disconnect.

    Read in chunks, not `readline()`: stdout and stderr share the channel's receive window,
    and asyncssh's `readline()` meets a line longer than that window with IncompleteReadError.
    Chunks keep stderr drained whatever the agent prints; lines over 64 KiB are split.
    """
    pending = b""
    while True:
        try:
            chunk = await reader.read(STDERR_CHUNK)
        except (asyncssh.Error, OSError):
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) >= STDERR_CHUNK:
            lines.append(pending)
            pending = b""
        for line in lines:
            log_stderr_line(log, prefix, line, tail)
    if pending:
        log_stderr_line(log, prefix, pending, tail)


# -- commands -----------------------------------------------------------------------------


def remote_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """`argv` as one command line for the remote login shell: `exec [env K=V ...] argv...`.

    Every word is shell-quoted; a program path starting with `~/` becomes `"$HOME"/...`
    so that a per-user virtual environment still resolves.
    """
    assignments = []
    for key, value in (env or {}).items():
        _check_env_name(key)
        assignments.append(shlex.quote(f"{key}={value}"))
    return _command_line(argv, assignments)


def redacted_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command as it may appear in logs: environment names, never their values."""
    return _command_line(argv, [f"{key}=…" for key in env or {}])


def _command_line(argv: Sequence[str], assignments: Sequence[str]) -> str:
    if not argv:
        raise ValueError("a remote command needs a program")
    words = ["exec"]
    if assignments:
        words += ["env", *assignments]
    program = argv[0]
    words.append('"$HOME"/' + shlex.quote(program[2:]) if program.startswith("~/") else shlex.quote(program))
    words.extend(shlex.quote(arg) for arg in argv[1:])
    return " ".join(words)


def _check_env_name(key: str) -> None:
    if not ENV_NAME.match(key):
        raise ValueError(f"environment variable name {key!r}: expected letters, digits and _")


class _RedactCommands(logging.Filter):
    """Rewrites asyncssh's '  Command: %s' log records so env values never reach a log.

    asyncssh logs the exec request's command at INFO; ours carries `env KEY=VALUE`. The
    filter swaps each registered command for its redacted form while that channel opens.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._redacted: dict[str, str] = {}

    @contextlib.contextmanager
    def hiding(self, command: str, redacted: str) -> Any:
        with self._lock:
            self._redacted[command] = redacted
        try:
            yield
        finally:
            with self._lock:
                self._redacted.pop(command, None)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._redacted and isinstance(record.args, tuple):
            record.args = tuple(self._redacted.get(arg, arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


_REDACT = _RedactCommands()
# Connections and channels log through SSHLogger adapters over the one 'asyncssh' logger
# (only SFTP uses a child), and a logger's filters see every record it creates.
logging.getLogger("asyncssh").addFilter(_REDACT)


# -- connecting ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Resolved:
    """A target after the ssh config has had its say."""

    target: SSHTarget
    options: asyncssh.SSHClientConnectionOptions
    host: str  # HostName after the config
    port: int
    user: str
    proxy_jump: str | None
    known_hosts_paths: list[str] = field(default_factory=list)
    encrypted: EncryptedIdentity | None = None  # an identity_file that needs its passphrase or an agent

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _unreadable(target: SSHTarget, exc: OSError) -> str:
    """The one-line error for a file the host's ssh settings name that cannot be read here."""
    name = exc.filename
    why = exc.strerror or str(exc)
    if target.identity_file is not None and str(name) == str(target.identity_file):
        return (
            f"host {target.label}: cannot read its identity_file {name}: {why}; fix identity_file in "
            "the cluster file, or put the key there (it is read on this machine, not on the host)"
        )
    return (
        f"host {target.label}: cannot read {name}: {why}; fix the ssh config line that names it "
        "(an IdentityFile?) or put the file there"
    )


def _resolve(target: SSHTarget, settings: SSHSettings, unlocked: asyncssh.SSHKey | None = None) -> _Resolved:
    """Build the one options object for `target` (reads ssh config and keys: run in a thread).

    `unlocked`: the identity file's key, decrypted with its passphrase (see `_unlock`).
    """
    kwargs: dict[str, Any] = {
        "config": settings.config_paths(),
        "host": target.host,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "connect_timeout": settings.connect_timeout,
        "login_timeout": settings.connect_timeout,
        "encoding": None,
    }
    if target.port is not None:
        kwargs["port"] = target.port
    if target.user is not None:
        kwargs["username"] = target.user
    encrypted = None
    if unlocked is not None:
        kwargs["client_keys"] = [unlocked]
    elif target.identity_file is not None:
        kwargs["client_keys"] = [str(target.identity_file)]
        from batuta.transport.certs import warn_loose_key

        warn_loose_key(target.identity_file, log, f"host {target.label}: identity_file")  # `ssh -i` refuses it
        encrypted = encrypted_identity(target.identity_file)
        if encrypted is not None:
            # Skip the file rather than fail on it; the agent's copy of the key signs instead
            # (`_unlock` checks there is one). Offer that key only, as `ssh -i` offers it first.
            kwargs["ignore_encrypted"] = True
            if encrypted.public_key is not None:
                kwargs["agent_identities"] = [encrypted.public_key]
    options = asyncssh.SSHClientConnectionOptions(**kwargs)
    ciphers = preferred_ciphers(options.encryption_algs, get_default_encryption_algs(), _CPU_HAS_AES)
    if ciphers is not None:  # no Ciphers line in the ssh config: AES-GCM first (ssh_ciphers.py)
        options = asyncssh.SSHClientConnectionOptions(**kwargs, encryption_algs=ciphers)
    if settings.known_hosts is not None:
        paths = [str(settings.known_hosts)]
    elif isinstance(options.known_hosts, list | tuple) and options.known_hosts:
        paths = [str(Path(p).expanduser()) for p in options.known_hosts]  # UserKnownHostsFile
    else:
        paths = [str(Path("~/.ssh/known_hosts").expanduser())]
    jump = options.tunnel if isinstance(options.tunnel, str) else None
    return _Resolved(
        target=target,
        options=options,
        host=str(options.host),
        port=int(options.port),
        user=str(options.username),
        proxy_jump=jump,
        known_hosts_paths=paths,
        encrypted=encrypted,
    )


# -- encrypted identity files -------------------------------------------------------------


async def _unlock(resolved: _Resolved, settings: SSHSettings) -> _Resolved:
    """`resolved` as is if ssh-agent holds its encrypted identity; else re-resolved with the key
    decrypted by a passphrase typed on the terminal. Raises SSHKeyLockedError or SSHAuthError."""
    encrypted = resolved.encrypted
    assert encrypted is not None
    target = resolved.target
    agent_state = await _agent_cannot_sign(resolved, encrypted, settings)
    if agent_state is None:
        log.info("host %s: %s is encrypted; signing with ssh-agent's copy", target.label, encrypted.path)
        return resolved
    try:
        key = unlock_on_terminal(encrypted, target.label) if settings.ask_passphrase else None
    except PassphraseRefused as exc:
        raise SSHAuthError(f"host {target.label}: {exc}") from None
    if key is None:
        raise SSHKeyLockedError(
            f"host {target.label}: identity file {encrypted.path} is encrypted and {agent_state}; "
            f"load it with `ssh-add {encrypted.path}` (batuta asks for a passphrase only on a terminal, "
            "never from arguments or the environment)"
        )
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(_resolve, target, settings, key))


async def _agent_cannot_sign(resolved: _Resolved, encrypted: EncryptedIdentity, settings: SSHSettings) -> str | None:
    """None if ssh-agent holds the encrypted key (it signs then); else why not, for the error."""
    agent_path = resolved.options.agent_path or ""
    if not agent_path:
        return "no ssh-agent is running (SSH_AUTH_SOCK is not set)"
    held = await agent_holds(agent_path, encrypted.public_key, settings.connect_timeout)
    if held is None:
        return f"the ssh-agent at {agent_path} did not answer"
    if held:
        return None
    if encrypted.public_key is None:
        return f"{encrypted.path}.pub is missing, so ssh-agent's copy cannot be found"
    return "ssh-agent does not hold it"


async def _refused_login(resolved: _Resolved, settings: SSHSettings, exc: asyncssh.PermissionDenied) -> SSHAuthError:
    """The error for a login the host refused. asyncssh skips, without a word, an encrypted key
    that the ssh config's IdentityFile (or ~/.ssh/id_*) names and no ssh-agent holds; the host
    then refuses the login, and "check authorized_keys" would send the user to the wrong fix."""
    label = resolved.target.label
    locked: list[tuple[EncryptedIdentity, str]] = []
    if resolved.target.identity_file is None:  # a cluster file's identity_file was handled by `_unlock`
        named = cast(Sequence[str], resolved.options.config.get("IdentityFile", ()))
        paths = [str(path) for path in named] if named else [f"~/.ssh/{name}" for name in DEFAULT_IDENTITY_FILES]
        loop = asyncio.get_running_loop()
        for encrypted in await loop.run_in_executor(None, encrypted_among, paths):
            why = await _agent_cannot_sign(resolved, encrypted, settings)
            if why is not None:
                locked.append((encrypted, why))
    if locked:
        encrypted, why = locked[0]
        return SSHKeyLockedError(
            f"host {label} ({resolved.where}): permission denied: its key {encrypted.path} (from the ssh "
            f"config, or ssh's default) is encrypted and {why}, so it was not offered; load it with "
            f"`ssh-add {encrypted.path}` (or name it as identity_file in the cluster file to be asked "
            "for its passphrase on a terminal); if that is done and the host still refuses, check the user"
        )
    return SSHAuthError(
        f"host {label} ({resolved.where}): permission denied ({exc.reason}); check the user and "
        "identity_file, and that the public key is in that user's ~/.ssh/authorized_keys"
    )


def _split_hop(hop: str, behind: str = "") -> SSHTarget:
    """One ProxyJump element, `[user@]host[:port]`, as a target (`behind`: whom it leads to)."""
    user: str | None = None
    if "@" in hop:
        user, hop = hop.rsplit("@", 1)
    port: int | None = None
    if hop.startswith("[") and "]" in hop:  # [v6addr]:port
        host, _, rest = hop[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif hop.count(":") == 1:
        host, _, port_text = hop.partition(":")
        if not port_text.isdigit():
            raise SSHSettingsError(
                f"ProxyJump {hop!r}{f' (for {behind})' if behind else ''}: port must be a number; "
                "fix the ProxyJump line in the ssh config"
            )
        port = int(port_text)
    else:
        host = hop
    return SSHTarget(
        host=host, port=port, user=user or None, name=f"{host}, jump host for {behind}" if behind else host
    )


async def connect_ssh(
    target: SSHTarget,
    settings: SSHSettings,
    *,
    tunnel: asyncssh.SSHClientConnection | None = None,
    _depth: int = 0,
) -> tuple[asyncssh.SSHClientConnection, list[asyncssh.SSHClientConnection], str]:
    """An authenticated connection to `target` and the jump connections it rides on.

    Returns (connection, jump connections, "user@host:port"). The caller closes them all.
    Raises HostKeyError, SSHAuthError or SSHConnectError.
    """
    if _depth > MAX_JUMP_DEPTH:
        raise SSHConnectError(f"host {target.label}: more than {MAX_JUMP_DEPTH} ProxyJump hops (a loop?)")
    loop = asyncio.get_running_loop()
    try:
        resolved = await loop.run_in_executor(None, functools.partial(_resolve, target, settings))
    except OSError as exc:
        if exc.filename is None:  # not a file (a name lookup while canonicalizing): may pass
            raise SSHConnectError(f"host {target.label}: {exc.strerror or exc}") from exc
        raise SSHSettingsError(_unreadable(target, exc)) from exc  # an identity file missing or unreadable
    except (ValueError, asyncssh.Error) as exc:
        raise SSHSettingsError(
            f"host {target.label}: bad ssh settings: {exc}; fix the host's entry in the cluster file "
            "or its Host block in the ssh config"
        ) from exc
    if resolved.encrypted is not None:
        resolved = await _unlock(resolved, settings)

    jumps: list[asyncssh.SSHClientConnection] = []
    try:
        if tunnel is None and resolved.proxy_jump:
            hops = [hop.strip() for hop in resolved.proxy_jump.split(",") if hop.strip()]
            for hop in hops:
                hop_conn, hop_jumps, _ = await connect_ssh(
                    _split_hop(hop, target.label),
                    settings,
                    tunnel=jumps[-1] if jumps else None,
                    _depth=_depth + 1,  # later hops ride the previous one, so skip their config jump
                )
                jumps.extend(hop_jumps)
                jumps.append(hop_conn)
            tunnel = jumps[-1] if jumps else None
        conn = await _connect_one(resolved, settings, tunnel)
    except BaseException:
        for jump in reversed(jumps):
            jump.abort()
        raise
    return conn, jumps, resolved.where


async def _connect_one(
    resolved: _Resolved, settings: SSHSettings, tunnel: asyncssh.SSHClientConnection | None
) -> asyncssh.SSHClientConnection:
    known = KNOWN_HOSTS.load(resolved.known_hosts_paths)
    policy = HostKeyPolicy(known, settings.trust_on_first_use)
    label = resolved.target.label
    try:
        conn = await asyncssh.connect(
            resolved.target.host,
            resolved.port,
            options=resolved.options,
            tunnel=tunnel,  # None: no tunnel (ProxyJump is handled by `connect_ssh`)
            known_hosts=known,
            client_factory=lambda: policy,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise _host_key_error(resolved, settings, policy, exc) from exc
    except asyncssh.PermissionDenied as exc:
        raise await _refused_login(resolved, settings, exc) from exc
    except TimeoutError as exc:
        raise SSHConnectError(
            f"host {label} ({resolved.where}): no SSH session within {settings.connect_timeout:g}s; "
            "check the address and that the host is up (connect_timeout in [ssh] sets the limit)"
        ) from exc
    except ConnectionRefusedError as exc:
        raise SSHConnectError(
            f"host {label} ({resolved.where}): connection refused; is sshd running on port {resolved.port}?"
        ) from exc
    except socket.gaierror as exc:
        raise SSHConnectError(
            f"host {label}: cannot resolve {resolved.host!r} ({exc.strerror}); check the address"
        ) from exc
    except (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError) as exc:
        raise SSHConnectError(
            f"host {label} ({resolved.where}): the server closed the connection before SSH began; "
            f"is port {resolved.port} an SSH server? (a firewall, a proxy or sshd's MaxStartups can do this)"
        ) from exc
    except asyncssh.DisconnectError as exc:
        raise SSHConnectError(f"host {label} ({resolved.where}): {exc.reason}") from exc
    except (asyncssh.Error, OSError, ValueError) as exc:
        raise SSHConnectError(f"host {label} ({resolved.where}): {exc}") from exc
    if policy.learned is not None:
        host, port, key = policy.learned
        path = Path(resolved.known_hosts_paths[0])
        try:
            append_known_host(path, host, port, key)
        except OSError as exc:
            log.warning("host %s: trusted its key but could not record it in %s: %s", label, path, exc)
        else:
            log.warning(
                "host %s: trusted new host key %s on first use; recorded in %s",
                label,
                key.get_fingerprint(),
                path,
            )
    return conn


def _host_key_error(
    resolved: _Resolved, settings: SSHSettings, policy: HostKeyPolicy, exc: asyncssh.HostKeyNotVerifiable
) -> HostKeyError:
    label = resolved.target.label
    path = resolved.known_hosts_paths[0]
    shown = path.replace(str(Path.home()), "~", 1) if path.startswith(str(Path.home())) else path
    fingerprint = policy.offered.get_fingerprint() if policy.offered is not None else "?"
    where = f"{resolved.host}:{resolved.port}"
    if policy.verdict == "changed":
        pattern = known_hosts_pattern(resolved.host, resolved.port)
        return HostKeyError(
            f"host {label} ({where}): HOST KEY CHANGED: it offered {fingerprint}, which does not match "
            f"{shown}; refused (this can be a machine in the middle; trust_on_first_use never accepts "
            f"a changed key). If the host was reinstalled, remove the old key with "
            f"`ssh-keygen -R '{pattern}' -f {shown}` and add the new one after checking its fingerprint",
            changed=True,
        )
    if policy.verdict == "unknown":
        return HostKeyError(
            f"host {label} ({where}): unknown host key {fingerprint}, not in {shown}; add it with "
            f"`ssh-keyscan -p {resolved.port} {resolved.host} >> {shown}` after checking the "
            f"fingerprint, or set trust_on_first_use = true in [ssh]",
            changed=False,
        )
    return HostKeyError(f"host {label} ({where}): host key not accepted: {exc.reason}", changed=False)


async def open_ssh_stream(
    target: SSHTarget,
    argv: Sequence[str],
    settings: SSHSettings | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> SSHStream:
    """Connect to `target` and run `argv` there on one channel; its stdin/stdout are the stream.

    No terminal is requested, so the remote process sees EOF when the channel closes.
    Raises HostKeyError, SSHAuthError, SSHConnectError or SSHError.
    """
    settings = settings or SSHSettings()
    conn, jumps, where = await connect_ssh(target, settings)
    return await stream_on(conn, jumps, where, target, argv, settings, env=env)


async def stream_on(
    conn: asyncssh.SSHClientConnection,
    jumps: Sequence[asyncssh.SSHClientConnection],
    where: str,
    target: SSHTarget,
    argv: Sequence[str],
    settings: SSHSettings,
    *,
    env: Mapping[str, str] | None = None,
) -> SSHStream:
    """Run `argv` on a new channel of `conn` (from `connect_ssh`), which the stream then owns:
    closing the stream closes `conn` and `jumps`, and so does a failure to start it."""
    command = remote_command(argv, env)
    shown = redacted_command(argv, env)
    description = f"ssh {where}" + (f" via {len(jumps)} jump host{'s' if len(jumps) > 1 else ''}" if jumps else "")
    log.info("host %s: %s: starting %s", target.label, description, shown)
    try:
        with _REDACT.hiding(command, shown):
            process = await asyncio.wait_for(
                conn.create_process(command, encoding=None, request_pty=False, term_type=None),
                settings.connect_timeout,
            )
    except BaseException as exc:
        conn.abort()
        for jump in jumps:
            jump.abort()
        if isinstance(exc, TimeoutError):
            raise SSHError(
                f"host {target.label} ({where}): the server did not start the command within "
                f"{settings.connect_timeout:g}s"
            ) from exc
        if isinstance(exc, asyncssh.ChannelOpenError):
            raise SSHError(f"host {target.label} ({where}): could not open a session channel: {exc.reason}") from exc
        if isinstance(exc, asyncssh.Error | OSError):
            raise SSHError(f"host {target.label} ({where}): could not start the command: {exc}") from exc
        raise
    tail = StderrTail()
    stderr_task = asyncio.create_task(
        _forward_stderr(process.stderr, f"{target.label} agent", tail), name=f"stderr-{target.label}"
    )
    return SSHStream(
        conn=conn, process=process, jumps=jumps, description=description, stderr_task=stderr_task, stderr_tail=tail
    )
