"""A data link beside a host's channel: big arrays over TLS sockets the agent dials back.

An SSH channel moves bytes through asyncssh, which encrypts 32 KiB packets in Python: a few
hundred MB/s at best, on the event loop. The data link carries the *data* of streamed arrays
(`protocol/chunks.py`) instead, over two TLS connections per host, one per direction, each
driven by a thread of its own with a blocking socket: `sendall` of the array's memoryview and
`recv_into` straight into the array the receiver allocated for it, with the GIL released
while OpenSSL encrypts. Frames, heartbeats and small values stay on the channel.

Who dials whom: no port is opened on a worker. The coordinator listens (`DataListener`, on
an address the cluster file opts into) and tells each agent, over its already authenticated
channel, where to dial, a one-time token and the SHA-256 fingerprint of the listener's
certificate (a fresh self-signed one per listener, never written anywhere but a private
temporary file while it loads). The agent verifies the certificate against that fingerprint
before it sends anything, then proves it is that session's agent with the token. Nothing
secret is ever in argv. With `data_link_encryption = "none"` (a network the user trusts) the
connections are plain TCP instead, with no certificate: each end proves it holds the token
by an HMAC over both ends' nonces, without sending it (`linkauth.py`), and then the same
role, answer and streams follow, unencrypted.

On each connection, after TLS (`dial` / the listener)::

    agent -> coordinator: MAGIC (8) | token (32) | role (1: b"U" agent sends, b"D" agent receives)
    coordinator -> agent: b"\\x01" (accepted; a refused dialler is simply disconnected)

then, from the sending side only::

    first stream id (uint64) | { stream id (uint64) | length (uint64) | data (length) }*

A stream whose array is still being filled when it is sent (`transport/growing.py`: a
value the agent forwards while it arrives from a slot) has `GROWING` set in its length and
comes as pieces, each as soon as it is filled::

    { piece length (uint64) | data (piece length) }*    until the lengths add up to length

or, if its source died part-way, a piece length of `ABORTED` instead of the next piece:
the receiver then forgets the stream and the message that announced it (`on_aborted`),
and never hands half an array on; the sender answers that message again on the channel.

The first id says from which stream on the sender uses the link: every stream it announces
from then on travels here, in id order, each whole. The receiver (`BulkReceiver`) learns of
streams as their frames arrive on the channel (`expect`) and reads each one's bytes into
its array; a stream's bytes may arrive before its frame, so the reader waits (bounded) for
the frame. A link that fails mid-stream says so (`on_failed`); the session then ends like a
lost link, and its tasks are requeued (nothing resumes half a value).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from batuta.errors import TransportError
from batuta.transport.dropbehind import DropBehind
from batuta.transport.growing import Growing
from batuta.transport.linkauth import (
    NONCE_BYTES,
    PLAIN_MAGIC,
    PROOF_BYTES,
    agent_proof,
    coordinator_proof,
    find_token,
    new_nonce,
    proves_coordinator,
)
from batuta.transport.refusals import RefusalLog, address_of
from batuta.transport.tls import format_address, tune_socket

log = logging.getLogger("batuta.transport.bulk")

MAGIC = b"BATDATA1"
TOKEN_BYTES = 32
ROLE_AGENT_SENDS = b"U"
ROLE_AGENT_RECEIVES = b"D"
ACCEPTED = b"\x01"
_GREETING = len(MAGIC) + TOKEN_BYTES + 1
_FIRST = struct.Struct(">Q")
_HEADER = struct.Struct(">QQ")  # stream id, length
_PIECE = struct.Struct(">Q")  # a growing stream's piece length
GROWING = 1 << 63  # in a stream's length: its bytes come as pieces, as they are filled
ABORTED = (1 << 64) - 1  # as a piece length: the rest of the stream never comes

HANDSHAKE_TIMEOUT_S = 10.0  # TLS handshake and greeting, either side
REFUSALS_LOGGED = 5  # refused diallers logged per address and interval (as a worker logs them)...
REFUSAL_LOG_INTERVAL_S = 30.0  # ...the rest counted in one line at its end
ANNOUNCE_TIMEOUT_S = 300.0  # a stream's bytes arrived; its frame on the channel must follow within this
RECV_PIECE = 1 << 20  # the most one recv_into asks for (OpenSSL hands out one record per call anyway)
SEND_PIECE = 1 << 28  # the most one write hands OpenSSL (ssl's writes were once limited to 2 GiB)
MAX_HANDSHAKES = 32  # connections in their handshake at once, per listener; more are dropped
KEEPALIVE_S = 30.0
GROWING_POLL_S = 1.0  # a sender waiting for a growing array looks at its own state this often
GROWING_STALL_S = 300.0  # a growing array that gains nothing for this long breaks the link


class DataLinkError(TransportError):
    """The data link could not be set up, or broke."""


# -- sockets --------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    """`count` bytes, or None if the peer closed cleanly before the first; raises OSError
    (or ConnectionError on a close part-way)."""
    out = bytearray(count)
    view = memoryview(out)
    got = 0
    while got < count:
        n = sock.recv_into(view[got:], count - got)
        if not n:
            if got == 0:
                return None
            raise ConnectionError(f"closed {got} bytes into a {count}-byte header")
        got += n
    return bytes(out)


class _Socket:
    """A TLS (or, without encryption, plain) socket and a second handle on the same
    connection, to abort it from any thread (a shutdown wakes a thread blocked in it) without
    touching the TLS object's state. The thread that uses the socket closes it; anyone else
    only aborts it."""

    def __init__(self, conn: socket.socket, handle: socket.socket) -> None:
        self.conn = conn
        self._handle = handle
        self._aborted = False
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        with contextlib.suppress(OSError):
            self._handle.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Abort, then free both descriptors (only from the thread that uses the socket)."""
        self.abort()
        with contextlib.suppress(OSError):
            self._handle.close()
        with contextlib.suppress(OSError):
            self.conn.close()


# -- one direction: sending -----------------------------------------------------------------


class BulkSender:
    """Sends streams' bytes, in the order given, from a thread of its own.

    `send(stream_id, view)` is called on the event loop, right where the stream would have
    queued its chunks: the view is the caller's array (never copied); with `growing`, the
    array is still being filled and goes piece by piece as it is (module doc).
    `on_failed(reason)` is called on the loop if the socket fails; nothing is sent after that.
    """

    def __init__(
        self,
        sock: _Socket,
        first_stream_id: int,
        loop: asyncio.AbstractEventLoop,
        on_failed: Callable[[str], None],
        name: str,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._on_failed = on_failed
        self._queue: deque[tuple[int, memoryview, Growing | None]] = deque()
        self._current: Growing | None = None  # the growing array being sent (close wakes it)
        self._ready = threading.Condition()
        self._closed = False
        self.pending_bytes = 0  # queued or being written (read on the loop, for telemetry)
        self.sent_bytes = 0
        self._first = first_stream_id
        self._thread = threading.Thread(target=self._run, name=f"bulk-send-{name}", daemon=True)
        self._thread.start()

    def send(self, stream_id: int, view: memoryview, growing: Growing | None = None) -> None:
        with self._ready:
            if self._closed:
                return
            self._queue.append((stream_id, view, growing))
            self.pending_bytes += len(view)
            self._ready.notify()

    def close(self) -> None:
        """Stop now: what is queued is dropped, a write under way is cut."""
        with self._ready:
            self._closed = True
            self._queue.clear()
            self._ready.notify()
            current = self._current
        if current is not None:
            current.abort()  # wakes the thread waiting for it; the link is going anyway
        self._sock.abort()

    def _run(self) -> None:
        try:
            self._sock.conn.sendall(_FIRST.pack(self._first))
            while True:
                with self._ready:
                    while not self._queue and not self._closed:
                        self._ready.wait()
                    if self._closed:
                        return
                    stream_id, view, growing = self._queue.popleft()
                    self._current = growing
                if growing is None:
                    self._sock.conn.sendall(_HEADER.pack(stream_id, len(view)))
                    behind = DropBehind(view)  # a memory-mapped file is not kept mapped (dropbehind.py)
                    piece = behind.piece(SEND_PIECE)
                    for start in range(0, len(view), piece):  # the GIL is released while OpenSSL encrypts
                        self._sock.conn.sendall(view[start : start + piece])
                        behind.done(min(start + piece, len(view)))
                    sent = len(view)
                else:
                    sent = self._send_growing(stream_id, view, growing)
                    if sent < 0:
                        return
                with self._ready:
                    self._current = None
                    self.sent_bytes += sent
                    self.pending_bytes = sum(len(v) for _, v, _ in self._queue)
                del view, growing
        except (OSError, ValueError) as exc:
            if not self._closed:
                _call(self._loop, self._on_failed, f"sending: {exc}")
        finally:
            self._sock.close()

    def _send_growing(self, stream_id: int, view: memoryview, growing: Growing) -> int:
        """Send a growing array's bytes as they are filled; how many went (-1: closed)."""
        conn = self._sock.conn
        conn.sendall(_HEADER.pack(stream_id, len(view) | GROWING))
        sent = 0
        waited = 0.0
        while sent < len(view):
            filled = growing.wait_beyond(sent, GROWING_POLL_S)
            if self._closed:
                return -1
            if filled < 0:
                conn.sendall(_PIECE.pack(ABORTED))
                return sent
            if filled == sent:
                waited += GROWING_POLL_S
                if waited >= GROWING_STALL_S:
                    raise TimeoutError(f"stream {stream_id} gained nothing for {GROWING_STALL_S:g}s")
                continue
            waited = 0.0
            try:  # before its length goes out: a piece that cannot be had ends the stream
                data = growing.piece(view, sent, min(filled, sent + SEND_PIECE))
            except OSError:
                growing.abort()
                conn.sendall(_PIECE.pack(ABORTED))
                return sent
            conn.sendall(_PIECE.pack(len(data)))
            conn.sendall(data)
            sent += len(data)
        return sent


# -- one direction: receiving ---------------------------------------------------------------


class BulkReceiver:
    """Receives streams' bytes into the arrays the channel's frames announced.

    `expect(stream_id, flat)` is called on the loop for every stream the peer announces (a
    hook of the channel's `StreamAssembler`), from before the link is up: streams below the
    sender's first id come over the channel and are forgotten here once that id is known.
    `on_filled(stream_id, nbytes)` runs on the loop once a stream's bytes are all in;
    `on_aborted(stream_id)` once a growing stream's sender said the rest never comes (a side
    that never expects that passes None: it is then the peer's fault); `on_failed(reason)`
    if the link breaks part-way or the peer breaks its rules, and, with `eof_fails`, if the
    peer closes the connection between streams (the coordinator's view: an agent closes its
    end only when it is going, and its next value would find no link).
    """

    def __init__(self, name: str, *, eof_fails: bool) -> None:
        self._name = name
        self._eof_fails = eof_fails
        self._sinks: dict[int, np.ndarray | int] = {}  # an int: that many bytes, dropped (unheld)
        self._first: int | None = None  # the sender's first stream id, once read
        self._cond = threading.Condition()
        self._closed = False
        self._sock: _Socket | None = None
        self._thread: threading.Thread | None = None
        self._on_aborted: Callable[[int], None] | None = None
        self.received_bytes = 0  # a growing stream's counted piece by piece
        self.growing_streams = 0  # streams that came while their sender was still filling them
        self.aborted_streams = 0  # of those, streams whose sender gave up part-way

    @property
    def expected(self) -> int:
        """Streams announced whose bytes are still to come here."""
        return len(self._sinks)

    def expect(self, stream_id: int, flat: np.ndarray | int) -> None:
        with self._cond:
            if self._closed or (self._first is not None and stream_id < self._first):
                return
            self._sinks[stream_id] = flat
            self._cond.notify_all()

    def start(
        self,
        sock: _Socket,
        loop: asyncio.AbstractEventLoop,
        on_filled: Callable[[int, int], None],
        on_failed: Callable[[str], None],
        on_aborted: Callable[[int], None] | None = None,
    ) -> None:
        with self._cond:
            if self._closed:
                sock.close()
                return
            self._sock = sock
        self._on_aborted = on_aborted
        self._thread = threading.Thread(
            target=self._run, args=(sock, loop, on_filled, on_failed), name=f"bulk-recv-{self._name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._sinks.clear()
            self._cond.notify_all()
            sock = self._sock
        if sock is not None:
            sock.abort()  # its thread closes it

    def _sink(self, stream_id: int) -> np.ndarray | int | None:
        """The array stream `stream_id` fills, once its frame arrived (None: closed)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closed or stream_id in self._sinks, ANNOUNCE_TIMEOUT_S)
            if self._closed:
                return None
            if not ok:
                raise _Broken(f"stream {stream_id}'s bytes came, its frame did not within {ANNOUNCE_TIMEOUT_S:g}s")
            return self._sinks.pop(stream_id)

    def _run(
        self,
        sock: _Socket,
        loop: asyncio.AbstractEventLoop,
        on_filled: Callable[[int, int], None],
        on_failed: Callable[[str], None],
    ) -> None:
        conn = sock.conn
        try:
            first = _recv_exact(conn, _FIRST.size)
            if first is None:
                return
            (first_id,) = _FIRST.unpack(first)
            with self._cond:
                self._first = first_id
                for stream_id in [s for s in self._sinks if s < first_id]:
                    del self._sinks[stream_id]  # came over the channel
            last = first_id - 1
            while True:
                header = _recv_exact(conn, _HEADER.size)
                if header is None:
                    if self._eof_fails and not self._closed:
                        _call(loop, on_failed, "the other end closed its data connection")
                    return  # the peer closed between streams: its channel says why
                stream_id, length = _HEADER.unpack(header)
                growing = bool(length & GROWING)
                length &= ~GROWING
                if stream_id <= last:
                    raise _Broken(f"stream {stream_id} after stream {last} (ids must rise)")
                last = stream_id
                flat = self._sink(stream_id)
                if flat is None:
                    return
                size = flat if isinstance(flat, int) else flat.nbytes
                if length != size:
                    raise _Broken(f"stream {stream_id} is {size} bytes, the link sent {length}")
                # an array its receiver could not allocate: its bytes are read into a piece
                # of scratch, over and over, and dropped (chunks.py, `Unheld`)
                view = _Dropped(length) if isinstance(flat, int) else flat.data.cast("B")
                if growing:
                    complete = self._receive_growing(conn, stream_id, view)
                    del view, flat
                    if not complete:
                        assert self._on_aborted is not None  # else _receive_growing raised
                        _call(loop, self._on_aborted, stream_id)
                        continue
                else:
                    self._receive(conn, stream_id, view, 0, length)
                    del view, flat
                    self.received_bytes += length
                _call(loop, on_filled, stream_id, length)
        except _Broken as exc:
            _call(loop, on_failed, str(exc))
        except (OSError, ValueError) as exc:
            if not self._closed:
                _call(loop, on_failed, f"receiving: {exc}")
        finally:
            sock.close()

    @staticmethod
    def _receive(conn: socket.socket, stream_id: int, view: memoryview | _Dropped, start: int, end: int) -> None:
        got = start
        while got < end:
            n = conn.recv_into(view[got:], min(end - got, RECV_PIECE))
            if not n:
                raise ConnectionError(f"closed {got} bytes into stream {stream_id} ({len(view)} bytes)")
            got += n

    def _receive_growing(self, conn: socket.socket, stream_id: int, view: memoryview | _Dropped) -> bool:
        """A growing stream's pieces into its array; False if its sender aborted it."""
        if self._on_aborted is None:
            raise _Broken(f"stream {stream_id} came as pieces, which this direction never sends")
        length = len(view)
        got = 0
        with self._cond:
            self.growing_streams += 1
        while got < length:
            piece = _recv_exact(conn, _PIECE.size)
            if piece is None:
                raise ConnectionError(f"closed {got} bytes into stream {stream_id} ({length} bytes)")
            (count,) = _PIECE.unpack(piece)
            if count == ABORTED:
                with self._cond:
                    self.aborted_streams += 1
                return False
            if count == 0 or got + count > length:
                raise _Broken(f"a piece of {count} bytes at {got} of stream {stream_id} ({length} bytes)")
            self._receive(conn, stream_id, view, got, got + count)
            got += count
            with self._cond:
                self.received_bytes += count
        return True


class _Dropped:
    """Stands in for a stream's memoryview where its bytes are to be dropped: every slice is
    the same scratch buffer, at most `RECV_PIECE` long."""

    __slots__ = ("_length", "_scratch")

    def __init__(self, length: int) -> None:
        self._length = length
        self._scratch = memoryview(bytearray(min(length, RECV_PIECE)))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, part: slice) -> memoryview:
        start, stop, _ = part.indices(self._length)
        return self._scratch[: min(stop - start, len(self._scratch))]


class _Broken(Exception):
    """The peer broke the data link's rules."""


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
        loop.call_soon_threadsafe(fn, *args)


# -- the coordinator's listener -------------------------------------------------------------


def _server_context() -> tuple[ssl.SSLContext, bytes]:
    """A TLS server context with a fresh self-signed certificate, and its SHA-256 fingerprint.
    The key exists only in this process (and, while OpenSSL loads it, in a 0600 file of a
    0700 temporary folder that is removed at once)."""
    from cryptography.hazmat.primitives import serialization

    from batuta.transport.certs import SERVER, issue, new_ca

    ca = new_ca("batuta data link")
    leaf = issue(ca, SERVER, "batuta data link", hosts=["batuta-data-link"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_COMPRESSION
    with tempfile.TemporaryDirectory(prefix="batuta-data-") as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_bytes(leaf.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(leaf.key_pem())
        context.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    fingerprint = hashlib.sha256(leaf.cert.public_bytes(serialization.Encoding.DER)).digest()
    return context, fingerprint


Accepted = Callable[[str, _Socket], Callable[[], None] | None]
"""Told of a dialler that presented a known token: (role, socket). Returns what starts the
link's use of the socket once the dialler has its answer, or None to refuse it."""


class DataListener:
    """One listening socket of the coordinator's data links, with its certificate.

    `expect(token, on_accepted)` registers a session's one-time token; a dialler that
    presents it (with a role not yet taken) is handed to `on_accepted` on the loop, and one
    with any other token is disconnected. `forget(token)` withdraws it. Without `encrypted`
    the connections are plain TCP and the token is proven, never sent (`linkauth.py`); there
    is no certificate then, and `fingerprint` is zeros.
    """

    def __init__(self, host: str, port: int, *, encrypted: bool = True) -> None:
        self.bind_host = host
        self.encrypted = encrypted
        self._context: ssl.SSLContext | None = None  # None: plain TCP
        self.fingerprint = bytes(TOKEN_BYTES)
        if encrypted:
            self._context, self.fingerprint = _server_context()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._expected: dict[bytes, Accepted] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bulk-handshake")
        self._acceptor: asyncio.Task[None] | None = None
        self.refused = 0  # diallers turned away (wrong token, role taken, bad greeting)
        # a port scan, or anyone dialling in a loop: a few lines per address, then a count
        self._refusals = RefusalLog(log, burst=REFUSALS_LOGGED, interval=REFUSAL_LOG_INTERVAL_S)

    @property
    def where(self) -> str:
        return format_address(self.bind_host, self.port)

    def start(self) -> None:
        self._acceptor = asyncio.get_running_loop().create_task(self._accept(), name=f"data-listener-{self.where}")

    def expect(self, token: bytes, on_accepted: Accepted) -> None:
        self._expected[token] = on_accepted

    def forget(self, token: bytes) -> None:
        self._expected.pop(token, None)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("data listener %s: accept failed: %s", self.where, exc)
                await asyncio.sleep(0.1)  # EMFILE and the like: do not spin
                continue
            if len(self._handshakes) >= MAX_HANDSHAKES:
                conn.close()
                continue
            task = loop.create_task(self._serve(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = "?"
        with contextlib.suppress(OSError):
            peer = format_address(*conn.getpeername()[:2])
        tokens = list(self._expected)  # an agent dials once offered: its token is registered by now
        try:
            sock, token, role = await loop.run_in_executor(self._executor, self._handshake, conn, tokens)
        except (OSError, ValueError, DataLinkError) as exc:
            self.refused += 1
            self._refusals.refused(address_of(peer), "data listener %s: refused %s: %s", self.where, peer, exc)
            return
        on_accepted = self._expected.get(token)
        start = on_accepted(role.decode("ascii"), sock) if on_accepted is not None else None
        if start is None:
            self.refused += 1
            sock.close()
            self._refusals.refused(
                address_of(peer), "data listener %s: refused %s: unknown token or role already taken", self.where, peer
            )
            return
        try:
            await loop.run_in_executor(self._executor, sock.conn.sendall, ACCEPTED)
        except OSError:
            sock.abort()  # the link's thread meets the failure when it uses the socket, and says so
        start()  # only now: the sending side's first bytes must follow the answer

    def _handshake(self, conn: socket.socket, tokens: list[bytes]) -> tuple[_Socket, bytes, bytes]:
        conn.setblocking(True)
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        handle = conn.dup()
        if self._context is None:
            sock = _Socket(conn, handle)
        else:
            try:
                tls = self._context.wrap_socket(conn, server_side=True)
            except (OSError, ValueError) as exc:
                handle.close()
                conn.close()
                raise DataLinkError(f"TLS handshake failed: {exc}") from None
            sock = _Socket(tls, handle)
        try:
            if self._context is None:
                token, role = _prove_plain_to_agent(sock.conn, tokens)
            else:
                greeting = _recv_exact(sock.conn, _GREETING)
                if greeting is None or greeting[: len(MAGIC)] != MAGIC:
                    raise DataLinkError("not a batuta data link greeting")
                token, role = greeting[len(MAGIC) : -1], _role(greeting[-1:])
            sock.conn.settimeout(None)
            tune_socket(sock.conn, keepalive_s=KEEPALIVE_S)
        except BaseException:
            sock.close()
            raise
        return sock, token, role

    async def close(self) -> None:
        self._expected.clear()
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._acceptor
        for task in list(self._handshakes):
            task.cancel()
        self._sock.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._refusals.close()  # what was only counted, said


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def _role(role: bytes) -> bytes:
    if role not in (ROLE_AGENT_SENDS, ROLE_AGENT_RECEIVES):
        raise DataLinkError(f"unknown role {role!r}")
    return role


def _prove_plain_to_agent(conn: socket.socket, tokens: list[bytes]) -> tuple[bytes, bytes]:
    """The coordinator's side of an unencrypted link's handshake (`linkauth.py`): the token
    the dialler proved it holds among `tokens`, and its role."""
    greeting = _recv_exact(conn, len(PLAIN_MAGIC) + 1 + NONCE_BYTES)
    if greeting is None or greeting[: len(PLAIN_MAGIC)] != PLAIN_MAGIC:
        raise DataLinkError("not a greeting of a batuta data link without encryption (a TLS dialler?)")
    role = _role(greeting[len(PLAIN_MAGIC) : len(PLAIN_MAGIC) + 1])
    agent_nonce, nonce = greeting[len(PLAIN_MAGIC) + 1 :], new_nonce()
    conn.sendall(nonce)
    proof = _recv_exact(conn, PROOF_BYTES)
    token = find_token(tokens, proof, role, agent_nonce, nonce) if proof is not None else None
    if token is None:
        raise DataLinkError("its proof matches no offered token (a wrong token or HMAC)")
    conn.sendall(coordinator_proof(token, role, agent_nonce, nonce))
    return token, role


def _prove_plain_to_coordinator(conn: socket.socket, token: bytes, role: bytes, where: str) -> None:
    """The agent's side: prove `token` without sending it, and check that the listener holds
    it too before anything else is sent (`linkauth.py`)."""
    agent_nonce = new_nonce()
    conn.sendall(PLAIN_MAGIC + role + agent_nonce)
    coordinator_nonce = _recv_exact(conn, NONCE_BYTES)
    if coordinator_nonce is None:
        raise DataLinkError(f"{where} refused the token")
    conn.sendall(agent_proof(token, role, agent_nonce, coordinator_nonce))
    proof = _recv_exact(conn, PROOF_BYTES)
    if proof is None:
        raise DataLinkError(f"{where} refused the token")
    if not proves_coordinator(proof, token, role, agent_nonce, coordinator_nonce):
        raise DataLinkError(f"{where} did not prove it holds the token (a wrong HMAC): not the coordinator")


# -- the agent's side -----------------------------------------------------------------------


def dial(
    host: str, port: int, token: bytes, fingerprint: bytes, role: bytes, timeout: float, *, encrypted: bool = True
) -> _Socket:
    """Connect to a coordinator's data listener (blocking: run it in a thread), check its
    certificate against `fingerprint` before sending anything, present `token` and `role`,
    and wait for the answer. Without `encrypted`: plain TCP, and both ends prove the token
    instead (`linkauth.py`). Raises DataLinkError saying what failed."""
    where = format_address(host, port)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DataLinkError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    handle = raw.dup()
    if not encrypted:
        return _handshaken(_Socket(raw, handle), where, lambda: _prove_plain_to_coordinator(raw, token, role, where))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is pinned by its fingerprint instead
    try:
        tls = context.wrap_socket(raw)
    except (OSError, ValueError) as exc:
        handle.close()
        raw.close()
        raise DataLinkError(f"TLS handshake with {where} failed: {exc}") from None

    def greet() -> None:
        der = tls.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(hashlib.sha256(der).digest(), fingerprint):
            raise DataLinkError(
                f"{where} presented a certificate other than the one the coordinator named; not sending the token"
            )
        tls.sendall(MAGIC + token + role)

    return _handshaken(_Socket(tls, handle), where, greet)


def _handshaken(sock: _Socket, where: str, greet: Callable[[], None]) -> _Socket:
    """`sock` once `greet` presented the token and the listener accepted it."""
    try:
        greet()
        answer = _recv_exact(sock.conn, 1)
        if answer != ACCEPTED:
            raise DataLinkError(f"{where} refused the token")
        sock.conn.settimeout(None)
        tune_socket(sock.conn, keepalive_s=KEEPALIVE_S)
    except DataLinkError:
        sock.close()
        raise
    except (OSError, ValueError) as exc:
        sock.close()
        raise DataLinkError(f"{where}: {exc}") from None
    return sock
