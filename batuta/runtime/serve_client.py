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
import os
import re
import shlex
import socket
import struct
from collections.abc import Awaitable, Callable
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
INFO_TIMEOUT_S = 5.0  # `batuta ps`: one coordinator that does not answer must not hold up the list long
CONTROL_TIMEOUT_S = 10.0  # `batuta stop`
READ_CHUNK = 256 * 1024
OPENING_KEPT = 1024 * 1024  # a worker's Hello is far smaller
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
            from batuta.transport.tls import format_address

            return f"tls://{format_address(*self.tls)}"
        return serve_paths.name_of(self.path) if self.path is not None else "?"


def parse_target(text: str | None, option: str = "--attach") -> Target:
    """A target from the command line (see the module docstring); UsageError names the fix.
    `option`: how the user passed it (`--attach`, `batuta stop`), which starts the errors."""
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
            # no default port: the default (9443) is a worker's, never a coordinator's
            return Target(tls=split_address(text.removeprefix("tls://"), None))
        except ValueError as exc:
            raise UsageError(f"{option} {text}: {exc}") from None
    colon, slash = text.find(":"), text.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        remote = _REMOTE.fullmatch(text)
        if remote is None:
            raise UsageError(f"{option} {text!r}: write user@host:NAME or host:/path/to/NAME.sock")
        where = remote["where"]
        if not where.startswith("/"):
            serve_paths.check_name(where)
        return Target(ssh_host=remote["host"], ssh_user=remote["user"], remote=where)
    if slash >= 0 or text.endswith(serve_paths.SUFFIX):
        return Target(path=Path(text).expanduser())
    return Target(path=serve_paths.socket_path(serve_paths.check_name(text)))


class Connection:
    """A byte stream to a coordinator, framed; closes whatever carries it (SSH included).

    `peer_pid`: the coordinator's process over a local socket (its peer credentials), which
    an error about a coordinator that does not answer names; None over SSH and TLS."""

    def __init__(
        self,
        reader: Any,
        writer: Any,
        label: str,
        on_close: Callable[[], None] | None = None,
        *,
        peer_pid: int | None = None,
        tls: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self.peer_pid = peer_pid
        self.tls = tls
        self._frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
        self._on_close = on_close
        self._ids = itertools.count(1)
        # the first bytes, kept until a message decodes: a peer that is no coordinator
        # (a batuta worker at a tls:// address) is then named instead of its wire error
        self._opening: bytearray | None = bytearray()

    async def receive(self) -> list[Any] | None:
        """The next message, or None when the coordinator closed the connection."""
        while True:
            try:
                message = self._frames.next()
            except ViewerProtocolError:
                if self._opening is not None and _is_worker_hello(bytes(self._opening)):
                    raise ViewerProtocolError(
                        f"{self.label}: that is a batuta worker, not a served coordinator; use the address "
                        "the coordinator was given with --serve-bind"
                    ) from None
                raise
            if message is not None:
                self._opening = None
                return message
            try:
                data = await self.reader.read(READ_CHUNK)
            except (ConnectionError, OSError) as exc:
                if self.tls and self._opening is not None:  # before its first message: the handshake's end
                    raise ServeError(self._refused(exc)) from None
                return None
            if not data:
                if self.tls and self._opening is not None and not self._opening:  # closed before a byte
                    raise ServeError(self._refused(ConnectionResetError("closed before its first message")))
                return None
            if self._opening is not None and len(self._opening) < OPENING_KEPT:
                self._opening += data[: OPENING_KEPT - len(self._opening)]
            self._frames.feed(data)

    async def send(self, message: list[Any]) -> None:
        try:
            self.writer.write(w.frame(message))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:  # it was a traceback (ConnectionResetError)
            opening = self.tls and self._opening is not None  # no message yet: the handshake's end
            raise ServeError(self._refused(exc) if opening else f"{self.label} closed the connection: {exc}") from None

    def _refused(self, exc: BaseException) -> str:
        """Why a TLS coordinator ended the connection before its first message: under TLS 1.3
        the client's certificate is judged after the client's handshake is done, so a refusal
        (another CA's certificate) arrives as the first read or write failing."""
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return (
            f"{self.label} ended the connection as it opened ({reason}): most likely it refused this client's "
            "certificate; check that --certs DIR holds a client certificate of the CA the coordinator serves "
            "with (its --serve-certs folder's ca.pem)"
        )

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


def _is_worker_hello(opening: bytes) -> bool:
    """Whether `opening` starts with what a `batuta worker`'s agent says first (its Hello, or
    the Error of a worker busy with a coordinator): the agent protocol, not the viewers'."""
    from batuta.protocol.codec import first_message
    from batuta.protocol.messages import Error, Hello

    return isinstance(first_message(opening, OPENING_KEPT), Hello | Error)


def _peer_pid(writer: Any) -> int | None:
    """The pid at the other end of a local socket (SO_PEERCRED, Linux), or None."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", credentials)[0])
    return pid or None


class NoAnswerError(ServeError):
    """The coordinator took the connection but did not answer in time (stopped, hung): not a
    mistake on the command line, and a request it was sent may still be acted on later."""


def _no_answer(connection: Connection, timeout: float) -> ServeError:
    pid = connection.peer_pid
    how = f"'kill -CONT {pid}' resumes a stopped one" if pid else "its machine's 'batuta ps' and its log say more"
    return NoAnswerError(
        f"{connection.label} did not answer within {timeout:g} s; is it stopped or hung? {how} (what was asked "
        "may still be done when it wakes)"
    )


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
        kind = serve_paths.kind_of(path)
        if kind is not None:  # the kernel refuses a connection to any file that is not a socket
            raise ServeError(
                f"{path} is {kind}, not a coordinator's socket; name a coordinator ('batuta ps' lists them)"
            ) from None
        raise ServeError(f"the coordinator of {path} is gone (stale socket); 'batuta ps' cleans it up") from None
    except PermissionError:
        raise ServeError(f"cannot connect to {path}: permission denied; attach as the user who started it") from None
    except TimeoutError:
        raise ServeError(
            f"{target.label} did not take the connection within {timeout:g} s; is it stopped or hung?"
        ) from None
    except OSError as exc:
        raise ServeError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return Connection(reader, writer, target.label, peer_pid=_peer_pid(writer))


async def _connect_tls(target: Target, certs: Path | None, timeout: float) -> Connection:
    import ssl

    from batuta.transport.tls import TLSSettings, client_context, read_names, verify_failure

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
    except ssl.SSLCertVerificationError as exc:  # one line and its fix, as `batuta run` says it of a worker
        names = await read_names(exc, host, port, certs / "ca.pem", host, timeout)  # which it holds
        raise ServeError(
            f"cannot connect to {target.label}: {verify_failure(exc, host, 'coordinator', names)}"
        ) from None
    except ssl.SSLError as exc:
        raise ServeError(
            f"cannot connect to {target.label}: TLS handshake failed ({exc.reason or exc}); check that --certs DIR "
            "holds a client certificate of the CA the coordinator serves with, and that the address is its "
            "--serve-bind"
        ) from None
    except TimeoutError:
        raise ServeError(
            f"cannot connect to {target.label}: no TLS session within {timeout:g} s; check the address and the firewall"
        ) from None
    except ConnectionRefusedError:  # asyncio's words: "Connect call failed ('127.0.0.1', 9)"
        raise ServeError(
            f"cannot connect to {target.label}: nothing listens there (connection refused); is its coordinator "
            "running, served with --serve-bind at that address? ('batuta ps' on its machine lists them)"
        ) from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ServeError(f"cannot connect to {target.label}: {why}") from None
    return Connection(reader, writer, target.label, tls=True)


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
    script = 'if [ -n "$BATUTA_RUNTIME_DIR" ]; then echo "$BATUTA_RUNTIME_DIR"; else echo "/tmp/batuta-$(id -u)"; fi'
    result = await conn.run(f"sh -c {shlex.quote(script)}", check=True)
    out = result.stdout
    folder = (out.decode(errors="replace") if isinstance(out, bytes) else str(out)).strip()
    if not folder.startswith("/"):
        raise ServeError(f"the remote shell gave {folder!r} as its runtime folder")
    return folder


# -- one-shot requests: `batuta ps`, `batuta stop` -------------------------------------------


async def ask_info(target: Target, *, certs: Path | None = None, timeout: float | None = None) -> dict[str, Any]:
    """What the coordinator at `target` says about itself (`batuta ps`)."""
    timeout = INFO_TIMEOUT_S if timeout is None else timeout
    message = await _ask(target, lambda c: c.send(["info"]), certs=certs, ssh=None, timeout=timeout)
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
    timeout: float | None = None,
) -> tuple[bool, str]:
    """Send one control request (`batuta stop`) and return the coordinator's (ok, line)."""
    timeout = CONTROL_TIMEOUT_S if timeout is None else timeout
    message = await _ask(target, lambda c: c.control(action, argument), certs=certs, ssh=ssh, timeout=timeout)
    if message is None or message[0] != "reply" or len(message) != 4:
        raise ViewerProtocolError(f"{target.label} did not answer {action!r}")
    return w.want_bool(message[2], "reply.ok"), w.want_str(message[3], "reply.text")


async def wait_gone(target: Target, *, certs: Path | None, ssh: SSHSettings | None, timeout: float) -> bool:
    """Whether the coordinator at `target` has ended within `timeout` seconds (`batuta stop`
    over SSH or TLS, where no socket file shows it): attached as a viewer, whose connection
    ends with the coordinator; one that cannot be reached any more has ended."""
    try:
        connection = await connect(target, certs=certs, ssh=ssh, timeout=timeout)
    except ServeError:
        return True
    try:
        async with asyncio.timeout(timeout):
            await connection.send(["attach", w.VERSION])
            for _ in range(1_000_000):  # bounded: a coordinator sends a few messages a second
                message = await connection.receive()
                if message is None or message[0] == "bye":
                    return True
    except TimeoutError:
        return False
    except (ServeError, OSError):
        return True
    finally:
        await connection.close()
    return False


async def _ask(
    target: Target,
    request: Callable[[Connection], Awaitable[object]],
    *,
    certs: Path | None,
    ssh: SSHSettings | None,
    timeout: float,
) -> list[Any] | None:
    """One request and the first message back; ServeError when none comes within `timeout`
    (a coordinator stopped with SIGSTOP still takes connections: the kernel queues them)."""
    connection = await connect(target, certs=certs, ssh=ssh, timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            await request(connection)
            return await connection.receive()
    except TimeoutError:
        raise _no_answer(connection, timeout) from None
    finally:
        await connection.close()
