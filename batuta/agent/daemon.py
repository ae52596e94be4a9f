"""`batuta worker`: a long-lived host agent that coordinators reach over mutual TLS.

The daemon listens on a TCP port (127.0.0.1 unless `--bind` says otherwise), completes a
TLS 1.2+ handshake that requires a client certificate signed by `--ca`, and then serves the
same protocol an SSH channel carries, one coordinator at a time:

    coordinator ==TLS==> daemon --pipes--> `python -m batuta.agent --stdio ...` --> slots

How the agent runs over the socket: each accepted session gets a fresh agent process, and
the daemon relays bytes between the TLS stream and the agent's stdin/stdout. This is the
least invasive way, and also the sturdiest:

* The `Agent` stays exactly as the SSH path runs it (its fd reader/writer work on pipes,
  `main.py` claims stdio, EOF on stdin is "the coordinator is gone"), so there is one
  agent to test and no second code path inside it.
* TLS cannot be handed to the agent as a raw fd (the bytes on the socket are ciphertext);
  running `Agent` in the daemon's own process would mean forking slots out of a process
  that holds the listening socket and the TLS state, sharing signal handlers and letting
  one session's failure take the daemon down. A process per session has none of that and
  starts in about 0.25 s (what an SSH session pays anyway).
* "When a coordinator disconnects, its work is killed" is then the agent's EOF rule: the
  daemon closes the agent's stdin, the agent kills every slot's process group and exits;
  if it has not exited within a bound it gets SIGTERM, then SIGKILL. Slots carry a
  parent-death signal, so nothing outlives the agent; the daemon never leaves orphans.

One coordinator at a time: while a session is active, a second connection that passes the
TLS handshake gets one protocol `Error` frame ("worker busy: ...") and is closed; an
unauthenticated one never gets a byte. The frame names the coordinator it serves, when it
last heard from it, and by when at the latest it lets it go if it stays silent: a coordinator
stopped with Ctrl-Z keeps its TCP connection (its kernel still answers), so the worker is
free only once its agent gives up on the silence (the coordinator's `Welcome.silence_limit`,
`PoolConfig.agent_silence_limit`, read from its first bytes). It is not cut short for the one
waiting: a coordinator whose loop is busy for a while is silent too, and a stopped one may be
resumed, its hosts' silence forgiven (`liveness.Stalled`). The coordinator retries a busy
worker with backoff (`TLSSettings.busy_timeout`). Once the active coordinator's connection has ended, the
session is only cleaning up (its agent killing its work and exiting, a fraction of a
second): a coordinator that connects then waits for that to finish instead of being
refused, so coordinators that follow each other at once are all served. A peer that
vanishes without a FIN (a cut cable) is found by TCP keepalive and `TCP_USER_TIMEOUT`
(`--peer-timeout`), so a dead coordinator does not hold the worker forever. A coordinator
that completes the handshake but sends nothing within `welcome_timeout` is dropped too.

Before authentication, a connection costs the worker a handshake slot, so those are
guarded: at most `MAX_HANDSHAKING` in all and `max_handshakes_per_source` from one address
(one source cannot take every slot), and a client must start its handshake (a TLS client
sends its ClientHello at once) within `client_hello_timeout`, so idle connections are shed
in seconds. Refusals are logged per source address, a few per interval and then one line
counting the rest (`RefusalLog`), so a flood of connections cannot flood the log too.

Key material: only paths travel in argv; OpenSSL reads the key file itself. Nothing here
logs certificates' contents beyond the peer's subject name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from batuta.protocol.codec import encode_message, first_message
from batuta.protocol.messages import Error, Welcome
from batuta.transport.base import StreamClosedError, signal_process
from batuta.transport.local import agent_command
from batuta.transport.refusals import RefusalLog
from batuta.transport.tls import (
    DEFAULT_PORT,
    WORKER_BUSY,
    ServerTLSStream,
    TLSHandshakeError,
    format_address,
    server_context,
    tune_socket,
)

log = logging.getLogger("batuta.agent.daemon")

READ_CHUNK = 256 * 1024
MAX_HANDSHAKING = 64  # unauthenticated connections in their TLS handshake at once
AGENT_EXIT_TIMEOUT = 5.0  # after EOF on its stdin, before SIGTERM
# The longest a session takes to end once its coordinator has gone: the agent's exit with
# its escalation, its last words, the TLS close (see `_end_session`), and a margin.
SESSION_END_WAIT_S = AGENT_EXIT_TIMEOUT + 2.0 + 2.0 + 2.0 + 2.0 + 1.0
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
WELCOME_FRAME_LIMIT = 64 * 1024  # a Welcome is a few dozen bytes; the first bytes may hold more frames


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerOptions:
    """What `batuta worker` was asked to do."""

    cert: Path
    key: Path
    ca: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    slots: int | None = None
    gpus: str = "auto"
    kernel_modules: tuple[str, ...] = ()
    name: str | None = None
    python: str | None = None  # the agent's interpreter; None: this one
    handshake_timeout: float = 10.0  # TLS handshake, per connection
    client_hello_timeout: float = 2.0  # a client's first handshake bytes, after it connected
    max_handshakes_per_source: int = 8  # connections in their handshake from one address at once
    refusal_log_burst: int = 5  # refusals logged per source address and interval...
    refusal_log_interval: float = 30.0  # ...before the rest are only counted, in one line at its end
    welcome_timeout: float = 30.0  # first bytes from an authenticated coordinator
    peer_timeout: float = 20.0  # a silent or vanished peer is dropped after about this long
    agent_env: dict[str, str] = field(default_factory=dict)

    def agent_argv(self) -> list[str]:
        return agent_command(
            slots=self.slots, gpus=self.gpus, kernel_modules=self.kernel_modules, name=self.name, python=self.python
        )


@dataclass(slots=True)
class WorkerStats:
    """Counters, for logs and tests."""

    sessions: int = 0  # coordinator sessions served (agent started)
    refused_tls: int = 0  # connections refused before or in their TLS handshake (full, no cert, wrong CA, ...)
    refused_full: int = 0  # of those: refused unread, too many handshakes (in all or from the address)
    refused_busy: int = 0  # authenticated connections refused because a session was active
    agent_exit_codes: list[int | None] = field(default_factory=list)


class _Session:
    """One coordinator's connection and its agent process."""

    def __init__(self, peer: str, subject: str) -> None:
        self.peer = peer
        self.subject = subject
        self.started = time.monotonic()
        self.heard_at = self.started  # the coordinator's last bytes
        # from its Welcome: its agent exits after silence_limit without a byte from it (0: never),
        # checked every heartbeat_interval; None while unknown
        self.silence_limit: float | None = None
        self.heartbeat_interval = 0.0
        self._welcome_read = False
        self.agent: asyncio.subprocess.Process | None = None
        self.ending = False  # the coordinator's side is over; only the agent's clean-up is left

    def heard(self, data: bytes) -> None:
        """The coordinator sent `data`; its first bytes are its Welcome (the agent spoke first)."""
        self.heard_at = time.monotonic()
        if not self._welcome_read:
            self._welcome_read = True  # looked for once: anything else first leaves it unknown
            welcome = first_message(data[:WELCOME_FRAME_LIMIT], WELCOME_FRAME_LIMIT)
            if isinstance(welcome, Welcome):
                self.silence_limit = welcome.silence_limit
                self.heartbeat_interval = welcome.heartbeat_interval

    def busy_message(self, worker: str) -> str:
        """The refusal a second coordinator gets: who holds the worker, and until when at most."""
        now = time.monotonic()
        silent = now - self.heard_at
        who = f"{self.subject} from {self.peer}, for {now - self.started:.0f} s, last heard from {silent:.0f} s ago"
        limit = self.silence_limit
        if limit is not None and limit > 0:
            # its agent checks the silence every heartbeat, then exits (a second, with its slots)
            left = max(0, math.ceil(limit + self.heartbeat_interval + 1.0 - silent))
            until = (
                f"it is free when that one ends, or in {left} s at the latest if it stays silent (stopped "
                f"with Ctrl-Z, or cut off: its agent_silence_limit is {limit:g} s)"
            )
        elif limit == 0:
            until = (
                "it is free when that one ends (its agent_silence_limit is 0: stopped with Ctrl-Z, it holds "
                "the worker until it is resumed or ended)"
            )
        else:
            until = "it is free when that one ends"
        one = "a worker serves one coordinator at a time"
        return f"{WORKER_BUSY}: {worker} serves another coordinator ({who}); {until}; {one}"


class WorkerDaemon:
    """The TLS listener and its one session. `await start()`, then `await serve_forever()`
    or `await close()`; or `async with WorkerDaemon(options) as daemon:`."""

    def __init__(self, options: WorkerOptions, *, context: ssl.SSLContext | None = None) -> None:
        self.options = options
        self.stats = WorkerStats()
        self._context = context or server_context(cert=options.cert, key=options.key, ca=options.ca)
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._active: _Session | None = None
        self._handshaking = 0
        self._handshaking_from: dict[str, int] = {}  # by source address (host part)
        self.refusals = RefusalLog(log, burst=options.refusal_log_burst, interval=options.refusal_log_interval)
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> WorkerDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (the port is the real one when 0 was asked)."""
        assert self._sock is not None, "not started"
        sockname = self._sock.getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def busy(self) -> bool:
        return self._active is not None

    @property
    def handshakes_in_progress(self) -> int:
        """Connections accepted and not yet authenticated (each holds a handshake slot)."""
        return self._handshaking

    async def start(self) -> None:
        """Bind the listening socket. Raises OSError (address in use, no permission)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.options.host, self.options.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {self.options.host!r}")
        family, _, _, _, sockaddr = infos[0]
        sock = socket.create_server(sockaddr[:2], family=family, backlog=64, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self._acceptor = asyncio.create_task(self._accept_loop(sock), name="batuta-worker-accept")

    async def serve_forever(self) -> None:
        """Serve until `close()` is called (from a signal handler, say)."""
        await self._closed.wait()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no session is active; True if that happened within `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop listening, end the active session (its agent and work are killed), return."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._acceptor
        if self._sock is not None:
            self._sock.close()
        active = self._active
        if active is not None and active.agent is not None and active.agent.stdin is not None:
            active.agent.stdin.close()  # the agent's EOF: the session ends the usual way
            await self.wait_idle(AGENT_EXIT_TIMEOUT + 5.0)
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.refusals.close()
        self._closed.set()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._on_connection(conn), name="batuta-worker-conn")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    # -- one connection -------------------------------------------------------------------

    async def _on_connection(self, conn: socket.socket) -> None:
        tls: ServerTLSStream | None = None
        try:
            tls = await self._handshake(conn)
            if tls is not None:
                await self._serve_connection(tls, _format_peer(conn), _source(conn))
        except asyncio.CancelledError:
            _drop(tls, conn)
            raise
        except Exception:  # a bug here must never take the listener down
            log.exception("connection handler failed")
            _drop(tls, conn)

    async def _handshake(self, conn: socket.socket) -> ServerTLSStream | None:
        """TLS on an accepted socket; None after logging why it was refused (the client got
        a TLS alert saying so, where the handshake got far enough to send one)."""
        peer = _format_peer(conn)
        source = _source(conn)
        limit = self.options.max_handshakes_per_source
        full = ""
        if self._handshaking >= MAX_HANDSHAKING:
            full = f"{MAX_HANDSHAKING} TLS handshakes already in progress"
        elif self._handshaking_from.get(source, 0) >= limit:
            full = f"{limit} TLS handshakes from {source} already in progress"
        if full:
            self.stats.refused_tls += 1
            self.stats.refused_full += 1
            self.refusals.refused(source, "refused %s: %s", peer, full)
            _reset(conn)
            return None
        tune_socket(conn, keepalive_s=self.options.peer_timeout)
        tls = ServerTLSStream(conn, self._context)
        self._handshaking += 1
        self._handshaking_from[source] = self._handshaking_from.get(source, 0) + 1
        try:
            await tls.handshake(self.options.handshake_timeout, first_bytes_timeout=self.options.client_hello_timeout)
        except (TLSHandshakeError, TimeoutError, OSError) as exc:
            tls.abort()
            if isinstance(exc, TLSHandshakeError) and tls.names_probe():
                # a coordinator that refused our certificate, reading which names it holds
                # (transport/tls_names.py): its refusal is the line above, not a second one, and
                # this is batuta's own probe, nothing for the worker's operator to act on
                log.debug("%s read the names of this worker's certificate, after refusing it", peer)
                return None
            self.stats.refused_tls += 1
            reason = "no handshake in time" if isinstance(exc, TimeoutError) else str(exc)
            self.refusals.refused(source, "refused %s: TLS handshake failed: %s", peer, reason)
            return None
        finally:
            self._handshaking -= 1
            left = self._handshaking_from.pop(source) - 1
            if left:
                self._handshaking_from[source] = left
        return tls

    async def _serve_connection(self, tls: ServerTLSStream, peer: str, source: str) -> None:
        subject = _subject(tls.peer_certificate())
        if self._active is not None and self._active.ending:
            # The previous coordinator has gone and its agent is winding down: this one is
            # next, not refused (it may well be the same user's next command).
            await self.wait_idle(SESSION_END_WAIT_S)
        if self._active is not None:
            self.stats.refused_busy += 1
            active = self._active
            message = active.busy_message(self.options.name or os.uname().nodename)
            silent = time.monotonic() - active.heard_at
            self.refusals.refused(
                source, "refused %s (%s): busy with %s (heard from %.0f s ago)", peer, subject, active.peer, silent
            )
            await _send_and_close(tls, encode_message(Error(message=message)))
            return
        session = _Session(peer, subject)
        self._active = session
        self._idle.clear()
        try:
            await self._run_session(session, tls)
        finally:
            self._active = None
            self._idle.set()

    async def _run_session(self, session: _Session, tls: ServerTLSStream) -> None:
        argv = self.options.agent_argv()
        env = {**os.environ, **self.options.agent_env}
        try:
            agent = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # the agent's warnings go to the daemon's own stderr
                env=env,
                limit=READ_CHUNK,
            )
        except OSError as exc:
            log.error("cannot start the agent (%s): %s", argv[0], exc)
            await _send_and_close(tls, encode_message(Error(message=f"worker cannot start its agent: {exc}")))
            return
        session.agent = agent
        self.stats.sessions += 1
        log.info("session from %s (%s, %s): agent pid %d", session.peer, session.subject, tls.version, agent.pid)
        assert agent.stdin is not None and agent.stdout is not None
        inbound = asyncio.create_task(self._coordinator_to_agent(session, tls, agent.stdin), name="tls-in")
        outbound = asyncio.create_task(_agent_to_coordinator(agent.stdout, tls), name="tls-out")
        why = "coordinator disconnected"
        try:
            done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
            why = "agent ended the session" if outbound in done else inbound.result()
        finally:
            session.ending = True
            try:
                code = await _end_session(agent, inbound, outbound, tls)
            except asyncio.CancelledError:  # cancelled while cleaning up: no waiting, no leftovers
                signal_process(agent, signal.SIGKILL)  # its slots follow by their parent-death signal
                inbound.cancel()
                outbound.cancel()
                tls.abort()
                raise
            self.stats.agent_exit_codes.append(code)
        log.info(
            "session from %s ended after %.1fs: %s (agent exit %s)",
            session.peer,
            time.monotonic() - session.started,
            why,
            code,
        )

    async def _coordinator_to_agent(self, session: _Session, tls: ServerTLSStream, stdin: asyncio.StreamWriter) -> str:
        """Copy the coordinator's bytes to the agent; returns why it stopped."""
        first = True
        while True:
            try:
                if first:
                    data = await asyncio.wait_for(tls.read(), self.options.welcome_timeout)
                else:
                    data = await tls.read()
            except TimeoutError:
                return f"the coordinator sent nothing within {self.options.welcome_timeout:g}s"
            if not data:
                return "coordinator disconnected"
            session.heard(data)
            first = False
            try:
                stdin.write(data)
                await stdin.drain()
            except (ConnectionError, OSError):
                return "agent stopped reading"


async def _agent_to_coordinator(stdout: asyncio.StreamReader, tls: ServerTLSStream) -> None:
    """Copy the agent's bytes to the coordinator until the agent closes its stdout. If the
    coordinator is gone, keep draining the pipe so the agent never blocks writing to it."""
    broken = False
    while True:
        try:
            data = await stdout.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return
        if not data:
            return
        if broken:
            continue
        try:
            await tls.write(data)
        except StreamClosedError:
            broken = True


async def _end_session(
    agent: asyncio.subprocess.Process,
    inbound: asyncio.Task[str],
    outbound: asyncio.Task[None],
    tls: ServerTLSStream,
) -> int | None:
    """EOF to the agent (it kills every slot and exits), wait for it, let its last words
    out to the coordinator, close the connection. Returns the agent's exit code."""
    if agent.stdin is not None:
        with contextlib.suppress(Exception):
            agent.stdin.close()
    code = await _stop_agent(agent)
    await asyncio.wait({outbound}, timeout=2.0)
    for task in (inbound, outbound):
        task.cancel()
    await asyncio.wait({inbound, outbound})
    await tls.close()
    return code


async def _stop_agent(agent: asyncio.subprocess.Process) -> int | None:
    """Wait for the agent (its stdin is closed), escalating to SIGTERM, then SIGKILL."""
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            signal_process(agent, signum)
        try:
            return await asyncio.wait_for(agent.wait(), AGENT_EXIT_TIMEOUT if signum is None else 2.0)
        except TimeoutError:
            continue
    return None


async def _send_and_close(tls: ServerTLSStream, data: bytes) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(tls.write(data), 2.0)
    await tls.close()


def _drop(tls: ServerTLSStream | None, conn: socket.socket) -> None:
    if tls is not None:
        tls.abort()
    else:
        conn.close()


def _reset(conn: socket.socket) -> None:
    """Close at once with a reset: no TIME_WAIT left here by a flood of refused connections."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _source(conn: socket.socket) -> str:
    """The peer's address without its port: what per-source limits and log limits count by."""
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "?"


def _format_peer(conn: socket.socket) -> str:
    try:
        peername = conn.getpeername()
    except OSError:
        return "?"
    return format_address(str(peername[0]), int(peername[1]))


def _subject(cert: dict[str, object]) -> str:
    """The client certificate's common name, for logs ("CN=batuta-coordinator")."""
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for key, value in rdn:
            if key == "commonName":
                return f"CN={value}"
    return "no CN"


# -- running it as a program --------------------------------------------------------------


async def run_worker(options: WorkerOptions, *, ready: asyncio.Future[tuple[str, int]] | None = None) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP; returns the exit code (0)."""
    daemon = WorkerDaemon(options)
    loop = asyncio.get_running_loop()
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.warning("got %s: stopping", signal.Signals(signum).name)
        stop.set()

    # Ours before the socket is bound and "listening" is said: a SIGTERM just after that line
    # (a service manager's stop, a test's) met `batuta`'s Ctrl-C handler instead and exited 130,
    # "interrupted", without closing the worker.
    for signum in stop_signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await daemon.start()
        host, port = daemon.address
        where = format_address(host, port)
        scope = "this machine only" if host in LOOPBACK else "reachable from the network"
        print(
            f"batuta worker: listening on {where} ({scope}); TLS 1.2+, client certificates from {options.ca} required",
            file=sys.stderr,
            flush=True,
        )
        if ready is not None and not ready.done():
            ready.set_result((host, port))
        await stop.wait()
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)
        await daemon.close()
    return 0
