"""TLS transport: a coordinator's stream to a long-lived `batuta worker` over mutual TLS.

The worker daemon (`batuta.agent.daemon`) listens on a TCP port; the coordinator connects,
both sides present certificates issued by one private CA (`batuta certs init`), and the
connection then carries the same framed protocol an SSH channel carries. The agent speaks
first (its Hello), which this module uses: `open_tls_stream` returns only once the first
bytes arrived, so a worker that refuses our certificate (TLS 1.3 reports that only after
the client's side of the handshake is done) is a clear, non-retryable error at connect
time rather than a silent close later.

Policy, both ends: TLS 1.2 or newer, certificates verified against the given CA only (not
the system store). The coordinator checks the server's name: the certificate's SAN must
name the address it dialled (or `server_name` when set), and its extended key usage must
allow serverAuth. The worker requires a client certificate with clientAuth.

Errors become `TLSError` subclasses at this edge. `retryable` is False where trying again
cannot help (a certificate refused either way, unreadable key files), so the pool retires
such a host at once instead of reconnecting with backoff. Key files are read by OpenSSL
from their paths; their contents never pass through Python strings, logs or argv.

A worker serves one coordinator at a time and limits connections in their handshake, so it
may turn us away for a while: "busy" (its protocol Error, `TLSBusyError`) or "full" (it
dropped the connection before the TLS handshake, `TLSFullError`). `connect_worker` retries
both with backoff for `TLSSettings.busy_timeout` seconds before giving up with a message
that says which it was and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batuta.errors import HostConfigError, TransportError
from batuta.protocol.codec import first_message
from batuta.protocol.messages import Error
from batuta.transport.base import Buffer, StreamClosedError, coalesced
from batuta.transport.tls_names import NAMES_PROBE, name_mismatch, names_presented, verify_hint

log = logging.getLogger("batuta.transport.tls")

READ_CHUNK = 256 * 1024
DEFAULT_PORT = 9443
WRITE_HIGH_WATER = 4 * 1024 * 1024
WORKER_BUSY = "worker busy"  # how a worker's Error frame starts when another coordinator has it
BUSY_FRAME_LIMIT = 64 * 1024  # a busy Error frame is small; a larger first frame is a Hello
RETRY_FIRST_DELAY_S = 0.1  # backoff for a busy or full worker: doubles each try...
RETRY_MAX_DELAY_S = 2.0  # ...up to this
RETRY_MAX_ATTEMPTS = 100  # and never more tries than this, whatever busy_timeout says


# -- errors -------------------------------------------------------------------------------


class TLSError(TransportError):
    """Something between us and a TLS worker went wrong."""


class TLSConnectError(TLSError):
    """No TLS session: connection refused or reset, timed out, name not resolved (retryable)."""


class TLSConfigError(TLSError, HostConfigError):
    """A CA, certificate or key file is missing, unreadable or does not match (not retryable)."""


class TLSVerifyError(TLSError):
    """The worker's certificate failed verification: wrong CA, expired, or wrong name."""

    retryable = False


class TLSRefusedError(TLSError):
    """The worker refused our client certificate (its CA does not trust it, or it expired)."""

    retryable = False


class TLSBusyError(TLSConnectError):
    """The worker serves another coordinator (one at a time); retried until busy_timeout."""


class TLSFullError(TLSConnectError):
    """The worker dropped the connection before the TLS handshake: it had too many connections
    in their handshake (from our address, or in all). Retried until busy_timeout."""


# -- settings and contexts ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """How the coordinator reaches TLS workers (the cluster file's `[tls]` table).

    `ca`: the CA certificate that signed the workers' certificates. `cert`, `key`: this
    coordinator's client certificate and its private key (PEM, unencrypted, mode 0600).
    `server_name`: the name to check the worker's certificate against; None means the
    address that is dialled. `hello_timeout`: how long a worker may take, after the TLS
    handshake, to start its agent and send the first bytes. `busy_timeout`: how long to keep
    retrying, with backoff, a worker that is busy with another coordinator or full (0: try once).
    """

    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None
    connect_timeout: float = 10.0
    hello_timeout: float = 30.0
    busy_timeout: float = 30.0


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path, ca: Path, who: str) -> None:
    """Load our certificate and key and the CA; file problems become TLSConfigError."""
    for label, path in (("CA certificate", ca), ("certificate", cert), ("key", key)):
        if Path(path).is_dir():
            raise TLSConfigError(
                f"{who}: {label} {path} is a folder; give the file in it (`batuta certs init DIR` writes "
                "ca.pem, server.pem and server.key for a worker, client.pem and client.key for a coordinator)"
            )
        if not Path(path).is_file():
            raise TLSConfigError(f"{who}: {label} {path}: no such file; create one with `batuta certs init DIR`")
    from batuta.transport.certs import validity_problem, warn_foreign_issuer, warn_loose_key  # cryptography: here

    warn_loose_key(key, log, who)  # said where it is loaded, as `batuta worker --key` says it
    # A worker started with the ca.pem of another folder than its server.pem's ran silently,
    # and every coordinator's handshake then failed with words about the coordinator's files.
    warn_foreign_issuer(cert, ca, log, who)

    for label, path in (("certificate", cert), ("CA certificate", ca)):
        # Said here, where the fix is: the peer would only say "certificate expired" at each handshake.
        problem = validity_problem(path)
        if problem is not None:
            raise TLSConfigError(
                f"{who}: {label} {path} {problem}; make new ones with `batuta certs init DIR` "
                "and give them to both sides"
            )
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSConfigError(f"{who}: cannot load CA certificate {ca}: {_reason(exc)}") from None
    try:
        # No password callback: an encrypted key fails here instead of prompting on a tty.
        context.load_cert_chain(certfile=str(cert), keyfile=str(key), password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSConfigError(
            f"{who}: cannot load certificate {cert} with key {key}: {_reason(exc)}; the key must be "
            "an unencrypted PEM key that matches the certificate"
        ) from None


def _no_password() -> str:
    raise ValueError("the key is encrypted; batuta needs an unencrypted key file (mode 0600)")


def _base_context(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_COMPRESSION
    # TLS 1.2 needs forward secrecy and AEAD ciphers; 1.3 suites are all fine.
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    return context


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """The coordinator's context: verifies the worker against `settings.ca`, names checked."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    _load_chain(context, settings.cert, settings.key, settings.ca, "tls")
    from batuta.transport.certs import ca_problem, client_use_problem

    # As a listener's are (server_context): a server.pem as [tls] cert, or a leaf as [tls] ca,
    # loads, and every handshake then fails with words about the other side.
    problem = client_use_problem(settings.cert)
    if problem is not None:
        raise TLSConfigError(
            f"tls: certificate {settings.cert} {problem}; give the client.pem (and client.key) of a "
            "`batuta certs init DIR` folder as [tls] cert and key"
        )
    problem = ca_problem(settings.ca)
    if problem is not None:
        raise TLSConfigError(
            f"tls: CA certificate {settings.ca} {problem}; give the ca.pem of the `batuta certs init DIR` "
            f"folder that issued {Path(settings.cert).name} as [tls] ca"
        )
    return context


def server_context(*, cert: Path, key: Path, ca: Path, who: str = "worker") -> ssl.SSLContext:
    """A listener's context (the worker's; a served coordinator's viewer port): requires a
    client certificate signed by `ca` (clientAuth). `who` starts its errors."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, cert, key, ca, who)
    context.set_alpn_protocols([NAMES_PROBE])  # a refused coordinator's probe, known as one (tls_names.py)
    from batuta.transport.certs import ca_problem, server_use_problem

    # Said here, at start: OpenSSL loads a client.pem or a leaf as the CA without complaint,
    # and every coordinator would then fail its handshake with a hint about its own files.
    problem = server_use_problem(cert)
    if problem is not None:
        raise TLSConfigError(
            f"{who}: certificate {cert} {problem}; pass the server.pem (and server.key) of a "
            "`batuta certs init DIR` folder"
        )
    problem = ca_problem(ca)
    if problem is not None:
        raise TLSConfigError(
            f"{who}: CA certificate {ca} {problem}; pass the ca.pem of the `batuta certs init DIR` folder "
            f"that issued {Path(cert).name}"
        )
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (exc.verify_message or str(exc)).rstrip(".")
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- addresses ----------------------------------------------------------------------------


def split_address(
    text: str, default_port: int | None = DEFAULT_PORT, *, default_host: str = "127.0.0.1"
) -> tuple[str, int]:
    """`host:port`, `[v6addr]:port`, `host` or `:port` as (host, port). Raises ValueError.

    `default_port` None: the port must be written. A served coordinator's has no default:
    9443 is a worker's, so a coordinator address without one would reach a worker."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty address; expected HOST:PORT, e.g. 10.0.0.1:{default_port or 9470}")
    host, port_text = text, ""
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT, e.g. [::1]:{default_port or 9470}")
        host, port_text = inside, rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. {_bracketed(text, default_port)}")
    if host.isdigit() and not port_text:
        raise ValueError(f"{text!r} looks like a port: write HOST:PORT, e.g. 127.0.0.1:{text} (or :{text})")
    host = host or default_host
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port; write HOST:PORT, e.g. {format_address(host, 9470)}")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a TCP port (0 to 65535)")
    return host, int(port_text)


def _bracketed(text: str, default_port: int | None) -> str:
    """`text`, an IPv6 address without brackets, as it should be written."""
    whole = f"[{text}]:{default_port if default_port is not None else 'PORT'}"
    head, _, tail = text.rpartition(":")
    try:
        ipaddress.IPv6Address(head)
    except ValueError:
        return whole
    if tail.isdigit() and int(tail) <= 65535:
        # `::1:9482` is an IPv6 address itself, but far more likely ::1 and port 9482
        return f"[{head}]:{tail} (or {whole} if all of it is the address)"
    return whole


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the stream ---------------------------------------------------------------------------


class TLSStream:
    """A `ByteStream` over one TLS connection to a worker daemon."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        description: str,
        first: bytes = b"",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._description = description
        self._first = first
        self._how = ""  # how the connection ended, once it has: "EOF", "reset", a TLS alert
        self._ended = asyncio.Event()

    @property
    def description(self) -> str:
        return self._description

    @property
    def peer_certificate(self) -> dict[str, object] | None:
        """The worker's certificate as `ssl.SSLSocket.getpeercert()` describes it."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        return ssl_object.getpeercert() if ssl_object is not None else None

    @property
    def tls_version(self) -> str | None:
        ssl_object = self._writer.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    async def read(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        try:
            data = await self._reader.read(READ_CHUNK)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            self._end(exc)
            return b""
        if not data:
            self._end(None)
        return data

    def _end(self, exc: BaseException | None) -> None:
        """Note how the connection ended, as the read saw it (a failed write says only
        "Connection lost"): `exc` None is EOF (close_notify or a bare close)."""
        if not self._ended.is_set():
            reset = isinstance(exc, ConnectionResetError)
            alert = isinstance(exc, ssl.SSLError)
            self._how = "EOF" if exc is None else "reset" if reset else f"TLS {_reason(exc)}" if alert else _reason(exc)
            self._ended.set()

    def write(self, data: bytes) -> None:
        self._write(data)

    def _write(self, data: Buffer) -> None:
        if self._writer.is_closing():
            raise StreamClosedError(f"{self._description}: stream closed")
        self._writer.write(data)

    async def how_it_ended(self, timeout: float) -> str:
        """How the connection ended: the agent's process is on its own machine, whose log
        says what became of it; "" while the connection has not ended (within `timeout`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        if not self._ended.is_set():
            return ""
        return (
            f"the TLS connection ({self._description}) closed ({self._how}) with no word from the agent: "
            "it ended there, or that machine or the network dropped the connection; the log there says which"
        )

    async def last_words(self, timeout: float) -> str:
        return ""  # a TLS worker's stderr stays on its own machine (its log)

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        for data in coalesced(parts):  # the transport copies each write into its own buffer: no join first
            self._write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise StreamClosedError(f"{self._description}: {exc}") from exc

    async def close(self, timeout: float = 2.0) -> None:
        """Send close_notify (the worker's agent then sees EOF and stops), then drop the link."""
        with contextlib.suppress(Exception):
            self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), timeout)
        except (TimeoutError, Exception):
            self.kill()

    def kill(self) -> None:
        transport = self._writer.transport
        with contextlib.suppress(Exception):
            transport.abort()


def tune_socket(sock: socket.socket | None, *, keepalive_s: float) -> None:
    """Find a dead peer in seconds, not the kernel's default of hours (keepalive), and give
    up on unacknowledged data after a bound (TCP_USER_TIMEOUT), so a link cut without a FIN
    does not keep a session (and the worker's one coordinator slot) open."""
    if sock is None:
        return
    idle = max(1, int(keepalive_s / 2))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, idle // 2)),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(keepalive_s * 1000)),
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    ]
    for level, name, value in options:
        if name is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(level, name, value)


async def open_tls_stream(
    host: str,
    port: int,
    settings: TLSSettings,
    *,
    name: str = "",
    context: ssl.SSLContext | None = None,
) -> TLSStream:
    """Connect to the worker at `host:port`, verify it, and wait for its first bytes.

    Raises TLSVerifyError (its certificate is not acceptable, names checked), TLSRefusedError
    (it refused ours), TLSConfigError (our files), TLSConnectError (retryable: refused, reset,
    timed out, unresolvable).
    """
    label = name or format_address(host, port)
    where = format_address(host, port)
    context = context or client_context(settings)
    server_name = settings.server_name or host
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=context,
                server_hostname=server_name,
                ssl_handshake_timeout=settings.connect_timeout,
                limit=READ_CHUNK,
            ),
            settings.connect_timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        names = await read_names(exc, host, port, settings.ca, server_name, settings.connect_timeout)
        raise TLSVerifyError(
            f"{_who(label, where)}: the worker's certificate is not acceptable: {_reason(exc)}; "
            + verify_hint(exc, server_name, names=names, dialled=settings.server_name is None)
        ) from None
    except ssl.SSLError as exc:
        raise _handshake_error(label, where, exc) from None
    except TimeoutError:
        raise TLSConnectError(
            f"{_who(label, where)}: no TLS session within {settings.connect_timeout:g}s; check the "
            "address, the firewall and that `batuta worker` is running there"
        ) from None
    except ConnectionRefusedError:
        raise TLSConnectError(
            f"{_who(label, where)}: connection refused; is `batuta worker --bind ...:{port}` running there?"
        ) from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        raise _dropped(label, where) from None
    except socket.gaierror as exc:
        raise TLSConnectError(f"host {label}: cannot resolve {host!r} ({exc.strerror}); check the address") from None
    except OSError as exc:
        raise TLSConnectError(f"{_who(label, where)}: {_reason(exc)}") from None
    tune_socket(writer.get_extra_info("socket"), keepalive_s=max(4.0, settings.connect_timeout))
    stream = TLSStream(reader, writer, description=f"tls {where}")
    version = stream.tls_version or "TLS"
    # The worker speaks first. Under TLS 1.3 a refused client certificate shows up here,
    # as an alert on the first read; a busy worker's Error frame is passed on as data.
    try:
        first = await asyncio.wait_for(reader.read(READ_CHUNK), settings.hello_timeout)
    except TimeoutError:
        stream.kill()
        raise TLSConnectError(
            f"{_who(label, where)}: the worker accepted the {version} session but sent nothing within "
            f"{settings.hello_timeout:g}s; check its log"
        ) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        stream.kill()
        first = b""  # the same as a plain close, below
    except ssl.SSLError as exc:
        stream.kill()
        raise _handshake_error(label, where, exc) from None
    except (ConnectionError, OSError) as exc:
        stream.kill()
        raise TLSConnectError(
            f"{_who(label, where)}: connection lost before the worker spoke: {_reason(exc)}"
        ) from None
    if not first:
        stream.kill()
        raise TLSConnectError(
            f"{_who(label, where)}: the worker closed the {version} session before saying hello; check its log"
        )
    busy = _busy_message(first)
    if busy is not None:
        stream.kill()
        raise TLSBusyError(f"{_who(label, where)}: {busy}")
    log.info("%s: %s session up", _who(label, where), version)
    return TLSStream(reader, writer, description=f"tls {where} ({version})", first=first)


def _busy_message(first: bytes) -> str | None:
    """The worker's "busy" Error, if that is what its first bytes are; None for anything else
    (its Hello, another Error), which the session then reads as usual."""
    message = first_message(first, BUSY_FRAME_LIMIT)
    if isinstance(message, Error) and message.message.startswith(WORKER_BUSY):
        return message.message
    return None


def _dropped(label: str, where: str) -> TLSFullError:
    return TLSFullError(f"{_who(label, where)}: the worker closed the connection before the TLS handshake")


async def connect_worker(
    host: str,
    port: int,
    settings: TLSSettings,
    *,
    name: str = "",
    context: ssl.SSLContext | None = None,
) -> TLSStream:
    """`open_tls_stream`, retrying a busy or full worker with backoff for `settings.busy_timeout`.

    The delay starts at 0.1 s and doubles up to 2 s; at most `RETRY_MAX_ATTEMPTS` tries. When
    the time is up, raises TLSBusyError or TLSFullError saying how long it tried and what to do;
    every other error is raised at once, as `open_tls_stream` raised it.
    """
    label = name or format_address(host, port)
    where = format_address(host, port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = RETRY_FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return await open_tls_stream(host, port, settings, name=name, context=context)
        except (TLSBusyError, TLSFullError) as exc:
            elapsed = loop.time() - started
            left = settings.busy_timeout - elapsed
            if left <= 0 or attempt >= RETRY_MAX_ATTEMPTS:
                raise _gave_up(exc, label, where, attempt, elapsed, settings.busy_timeout) from None
            log.info("%s; trying again in %.1fs", exc, min(delay, left))
            await asyncio.sleep(min(delay, left))  # backoff, not synchronisation
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


def _gave_up(
    exc: TLSBusyError | TLSFullError, label: str, where: str, attempts: int, elapsed: float, busy_timeout: float
) -> TLSConnectError:
    tried = "" if attempts == 1 else f" ({attempts} tries in {elapsed:.1f}s)"
    wait = "raise busy_timeout in [tls] to wait longer" if busy_timeout > 0 else "set busy_timeout in [tls] to wait"
    if isinstance(exc, TLSBusyError):
        return TLSBusyError(f"{exc}{tried}; try again when it is done, or {wait}")
    return TLSFullError(
        f"{_who(label, where)}: the worker was full: it closed the connection before the TLS handshake{tried}, "
        "as it does when too many connections (from this address, or in all) sit in their handshake; "
        f"its log names the sources it refused: stop or block them, or {wait}"
    )


def _who(label: str, where: str) -> str:
    return f"host {label}" if label == where else f"host {label} ({where})"


async def read_names(
    exc: ssl.SSLCertVerificationError, host: str, port: int, ca: Path, server_name: str, timeout: float
) -> list[str] | None:
    """The names a certificate refused for its names holds (`tls_names`); None for another refusal."""
    if not name_mismatch(exc):
        return None
    try:
        context = names_probe_context(ca)
    except (ssl.SSLError, OSError):
        return None
    return await names_presented(host, port, context, server_name, timeout)


def names_probe_context(ca: Path) -> ssl.SSLContext:
    """The context `tls_names.names_presented` reads a refused certificate's names with: the
    chain checked against `ca`, not the name; no certificate of ours; the probe's ALPN."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(ca))
    context.set_alpn_protocols([NAMES_PROBE])
    return context


def verify_failure(
    exc: ssl.SSLCertVerificationError, server_name: str, whose: str, names: Sequence[str] | None = None
) -> str:
    """Why a peer's certificate was refused, and what to do, in a line: "the coordinator's
    certificate is not acceptable: IP address mismatch; it names ... reissue ... --host 10.0.0.5"
    (`names`: those it holds, where `tls_names.names_presented` read them)."""
    hint = verify_hint(exc, server_name, whose, names=names)
    return f"the {whose}'s certificate is not acceptable: {_reason(exc)}; {hint}"


def _handshake_error(label: str, where: str, exc: ssl.SSLError) -> TLSError:
    reason = _reason(exc)
    text = reason.upper()
    if "ALERT" in text:
        return TLSRefusedError(
            f"{_who(label, where)}: the worker refused our client certificate ({reason}); check that "
            "[tls] cert is signed by the CA the worker was started with (--ca) and has not expired"
        )
    if "WRONG VERSION NUMBER" in text or "RECORD LAYER" in text or "PACKET LENGTH" in text:
        return TLSVerifyError(f"{_who(label, where)}: the peer does not speak TLS ({reason}); is it a batuta worker?")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return _dropped(label, where)
    return TLSVerifyError(f"{_who(label, where)}: TLS handshake failed: {reason}")


# -- the worker's side --------------------------------------------------------------------


class TLSHandshakeError(TLSError):
    """A client's TLS handshake failed (the worker refused it); the alert has been sent."""

    retryable = False


class ServerTLSStream:
    """The worker's end of one TLS connection, driven through memory BIOs.

    asyncio's own TLS transport drops the alert OpenSSL writes when a handshake fails, so a
    refused client would see a bare close and could not say why. Here every byte OpenSSL
    produces is sent, alerts included: a client without an acceptable certificate is told
    ("certificate required", "unknown ca", "certificate expired"). Reads and writes may run
    in two tasks at once; sends are serialised so TLS records leave in order.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._eof = False

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def peer_certificate(self) -> dict[str, object]:
        return dict(self._tls.getpeercert() or {})

    def names_probe(self) -> bool:
        """The client offered the names probe's ALPN (tls_names.py), known after a refusal too."""
        return self._tls.selected_alpn_protocol() == NAMES_PROBE

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data and not self._closed:
                await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def _fill(self) -> bool:
        """Read more ciphertext from the socket; False at end of stream."""
        try:
            data = await asyncio.get_running_loop().sock_recv(self._sock, 64 * 1024)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def handshake(self, timeout: float, *, first_bytes_timeout: float | None = None) -> None:
        """Complete the server handshake within `timeout`. Raises TLSHandshakeError (alert sent
        where there was a handshake to send it in) or TimeoutError.

        `first_bytes_timeout`: how long the client may take to send anything at all. A TLS
        client sends its ClientHello as soon as it has connected, so a connection that stays
        silent is not one, and is dropped long before `timeout`.
        """
        async with asyncio.timeout(timeout):
            if first_bytes_timeout is not None:
                try:
                    async with asyncio.timeout(first_bytes_timeout):
                        if not await self._fill():
                            raise TLSHandshakeError("the client closed the connection before the handshake")
                except TimeoutError:
                    raise TLSHandshakeError(
                        f"the client sent nothing within {first_bytes_timeout:g}s of connecting (not a TLS client?)"
                    ) from None
            while True:
                try:
                    self._tls.do_handshake()
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise TLSHandshakeError("the client closed the connection during the handshake") from None
                    continue
                except ssl.SSLError as exc:
                    with contextlib.suppress(Exception):
                        await self._flush()  # the alert tells the client why
                    raise TLSHandshakeError(_reason(exc)) from None
                await self._flush()
                return

    async def read(self) -> bytes:
        """Decrypted bytes from the client; b"" at close_notify, EOF or a broken stream."""
        while True:
            try:
                return self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # post-handshake records (tickets, key updates)
                if self._eof or not await self._fill():
                    self._eof = True
                    try:  # what is still buffered
                        return self._tls.read(READ_CHUNK)
                    except ssl.SSLError:
                        return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError:
                return b""

    async def write(self, data: bytes) -> None:
        """Encrypt and send `data`; raises StreamClosedError if the client is gone."""
        if self._closed:
            raise StreamClosedError("client connection closed")
        try:
            self._tls.write(data)
            await self._flush()
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise StreamClosedError(f"client connection broke: {_reason(exc)}") from exc

    async def close(self, timeout: float = 2.0) -> None:
        """Send close_notify (bounded), then close the socket."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            # unwrap() queues our close_notify, then wants the client's: we do not wait for it.
            with contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()
            await asyncio.wait_for(self._flush(), timeout)
        self.abort()

    def abort(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
