"""The viewer's end of a served coordinator: find it, connect, attach, ask, control.

A target names a coordinator in one of four ways:

* nothing: the only coordinator of this user on this machine;
* `NAME`: the socket NAME.sock in this user's runtime folder (batuta/runtime/serve_paths.py);
* a path (it holds a `/`): that socket;
* `[user@]host:NAME` (or `host:/path/to.sock`): over SSH, with the cluster's host-key rules
  (batuta/transport/ssh.py: known_hosts, no unknown keys unless trusted on first use); the
  remote Unix socket is opened over the SSH connection (`direct-streamlocal`), so nothing
  listens on a port and the remote user's socket permissions still apply;
* `tls://host:port`: a coordinator started with `--serve-bind`, with the client certificate
  of a `batuta certs init` folder (mutual TLS, batuta/transport/tls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batuta.errors import ServeError, TransportError, UsageError, ViewerProtocolError
from batuta.runtime import serve_paths
from batuta.runtime import serve_wire as w

if TYPE_CHECKING:
    from batuta.transport.ssh import SSHSettings
    from batuta.transport.ssh_settings import SSHTarget

CONNECT_TIMEOUT_S = 10.0
READ_CHUNK = 256 * 1024
_REMOTE = re.compile(r"(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s]+):(?P<where>\S+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a coordinator listens: a local socket, a socket on an SSH host, or a TLS address."""

    path: Path | None = None
    ssh_host: str | None = None
    ssh_user: str | None = None
    remote: str = ""  # NAME or a socket path on the SSH host
    tls: tuple[str, int] | None = None
    # how a cluster file reaches `ssh_host` when it names it (address, port, user, identity)
    ssh_via: SSHTarget | None = None

    @property
    def label(self) -> str:
        if self.ssh_host is not None:
            return f"{self.ssh_user + '@' if self.ssh_user else ''}{self.ssh_host}:{self.remote}"
        if self.tls is not None:
            return f"tls://{self.tls[0]}:{self.tls[1]}"
        return serve_paths.name_of(self.path) if self.path is not None else "?"


def parse_target(text: str | None) -> Target:
    """A target from the command line (see the module docstring); UsageError names the fix."""
    if not text:
        running = [p for p in serve_paths.listed_sockets() if not serve_paths.is_stale(p)]
        if len(running) == 1:
            return Target(path=running[0])
        if not running:
            raise UsageError("no coordinator is running here; start one with 'batuta run JOB --serve'")
        names = ", ".join(serve_paths.name_of(p) for p in running)
        raise UsageError(
            f"{len(running)} coordinators are running ({names}); name one, e.g. 'batuta tui --attach NAME'"
        )
    if text.startswith("tls://"):
        from batuta.transport.tls import split_address

        try:
            return Target(tls=split_address(text.removeprefix("tls://")))
        except ValueError as exc:
            raise UsageError(f"--attach {text}: {exc}; write tls://HOST:PORT") from None
    colon, slash = text.find(":"), text.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        remote = _REMOTE.fullmatch(text)
        if remote is None:
            raise UsageError(f"--attach {text!r}: write user@host:NAME or host:/path/to/NAME.sock")
        where = remote["where"]
        if not where.startswith("/"):
            serve_paths.check_name(where)
        return Target(ssh_host=remote["host"], ssh_user=remote["user"], remote=where)
    if slash >= 0 or text.endswith(serve_paths.SUFFIX):
        return Target(path=Path(text).expanduser())
    return Target(path=serve_paths.socket_path(serve_paths.check_name(text)))


class Connection:
    """A byte stream to a coordinator, framed; closes whatever carries it (SSH included)."""

    def __init__(self, reader: Any, writer: Any, label: str, on_close: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self._frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
        self._on_close = on_close
        self._ids = itertools.count(1)

    async def receive(self) -> list[Any] | None:
        """The next message, or None when the coordinator closed the connection."""
        while True:
            message = self._frames.next()
            if message is not None:
                return message
            try:
                data = await self.reader.read(READ_CHUNK)
            except (ConnectionError, OSError):
                return None
            if not data:
                return None
            self._frames.feed(data)

    async def send(self, message: list[Any]) -> None:
        self.writer.write(w.frame(message))
        await self.writer.drain()

    async def control(self, action: str, argument: str = "") -> int:
        """Send a control request; the reply comes later among the other messages. Returns its id."""
        request_id = next(self._ids)
        await self.send(["control", request_id, action, argument])
        return request_id

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


async def connect(
    target: Target, *, certs: Path | None = None, ssh: SSHSettings | None = None, timeout: float = CONNECT_TIMEOUT_S
) -> Connection:
    """Open a stream to the coordinator at `target`; ServeError says why it could not.

    `ssh`: how SSH hosts are reached (a cluster file's [ssh] table: known_hosts, ssh config,
    trust on first use); by default ~/.ssh/config and ~/.ssh/known_hosts, unknown keys refused.
    """
    if target.ssh_host is not None:
        return await _connect_ssh(target, ssh, timeout)
    if target.tls is not None:
        return await _connect_tls(target, certs, timeout)
    assert target.path is not None
    path = target.path
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=READ_CHUNK), timeout)
    except FileNotFoundError:
        raise ServeError(f"no coordinator at {path}; 'batuta ps' lists the running ones") from None
    except ConnectionRefusedError:
        raise ServeError(f"the coordinator of {path} is gone (stale socket); 'batuta ps' cleans it up") from None
    except PermissionError:
        raise ServeError(f"cannot connect to {path}: permission denied; attach as the user who started it") from None
    except (OSError, TimeoutError) as exc:
        raise ServeError(f"cannot connect to {path}: {exc}") from None
    return Connection(reader, writer, target.label)


async def _connect_tls(target: Target, certs: Path | None, timeout: float) -> Connection:
    from batuta.transport.tls import TLSSettings, client_context

    if certs is None:
        raise UsageError(f"{target.label} needs --certs DIR (client.pem, client.key, ca.pem of 'batuta certs init')")
    assert target.tls is not None
    host, port = target.tls
    try:
        context = client_context(TLSSettings(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key"))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host, limit=READ_CHUNK), timeout
        )
    except TransportError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, TimeoutError) as exc:
        raise ServeError(f"cannot connect to {target.label}: {exc}") from None
    return Connection(reader, writer, target.label)


async def _connect_ssh(target: Target, ssh: SSHSettings | None, timeout: float) -> Connection:
    """The remote socket over SSH; the remote runtime folder is asked of the remote shell."""
    from batuta.transport.ssh import SSHSettings, SSHTarget, connect_ssh

    assert target.ssh_host is not None
    settings = ssh if ssh is not None else SSHSettings(connect_timeout=timeout, ask_passphrase=False)
    try:
        via = target.ssh_via or SSHTarget(host=target.ssh_host, user=target.ssh_user)
        conn, jumps, _where = await connect_ssh(via, settings)
    except TransportError as exc:
        raise ServeError(f"cannot reach {target.label}: {exc}") from None

    def close_ssh() -> None:
        conn.close()
        for jump in reversed(jumps):
            jump.close()

    try:
        path = target.remote
        if not path.startswith("/"):
            folder = await _remote_runtime_dir(conn)
            path = f"{folder}/{path}{serve_paths.SUFFIX}"
        reader, writer = await asyncio.wait_for(conn.open_unix_connection(path), timeout)
    except Exception as exc:
        close_ssh()
        raise ServeError(
            f"no coordinator at {target.label} ({exc}); 'ssh {target.ssh_host} batuta ps' lists them"
        ) from None
    return Connection(reader, writer, target.label, on_close=close_ssh)


async def _remote_runtime_dir(conn: Any) -> str:
    """The SSH user's coordinator folder, by the rule of serve_paths.runtime_dir."""
    script = (
        'if [ -n "$XDG_RUNTIME_DIR" ] && [ -d "$XDG_RUNTIME_DIR" ]; '
        'then echo "$XDG_RUNTIME_DIR/batuta"; else echo "/tmp/batuta-$(id -u)"; fi'
    )
    result = await conn.run(f"sh -c {shlex.quote(script)}", check=True)
    out = result.stdout
    folder = (out.decode(errors="replace") if isinstance(out, bytes) else str(out)).strip()
    if not folder.startswith("/"):
        raise ServeError(f"the remote shell gave {folder!r} as its runtime folder")
    return folder


# -- one-shot requests: `batuta ps`, `batuta stop` -------------------------------------------


async def ask_info(target: Target, *, certs: Path | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """What the coordinator at `target` says about itself (`batuta ps`)."""
    connection = await connect(target, certs=certs, timeout=timeout)
    try:
        await connection.send(["info"])
        message = await asyncio.wait_for(connection.receive(), timeout)
    finally:
        await connection.close()
    if message is None or message[0] != "info" or len(message) != 2:
        raise ViewerProtocolError(f"{target.label} did not answer 'info'")
    return w.want_map(message[1], "info")


async def ask_control(
    target: Target,
    action: str,
    argument: str = "",
    *,
    certs: Path | None = None,
    ssh: SSHSettings | None = None,
    timeout: float = 10.0,
) -> tuple[bool, str]:
    """Send one control request (`batuta stop`) and return the coordinator's (ok, line)."""
    connection = await connect(target, certs=certs, ssh=ssh, timeout=timeout)
    try:
        await connection.control(action, argument)
        message = await asyncio.wait_for(connection.receive(), timeout)
    finally:
        await connection.close()
    if message is None or message[0] != "reply" or len(message) != 4:
        raise ViewerProtocolError(f"{target.label} did not answer {action!r}")
    return w.want_bool(message[2], "reply.ok"), w.want_str(message[3], "reply.text")
