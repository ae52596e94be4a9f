"""The agent's end of a data link (`transport/bulk.py`): it dials the coordinator back.

On `DataLink` the agent dials the named listener twice, in threads: one connection for what
it sends (results, fetched values), one for what it receives (put values, relayed inputs).
Each checks the listener's certificate against the fingerprint the message carried before it
presents the token (without encryption, the listener must prove it holds the token instead:
`transport/linkauth.py`). A direction that comes up carries every streamed array from then on; one
that cannot be set up is reported on stderr (the coordinator logs it) and that direction
stays on the channel. A link that breaks once up ends the agent with an Error: half a value
is never resumed, and the coordinator requeues what it had sent here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from batuta.protocol.connection import Connection
from batuta.protocol.errors import RemoteProtocolError
from batuta.protocol.messages import DataLink
from batuta.transport.bulk import (
    HANDSHAKE_TIMEOUT_S,
    ROLE_AGENT_RECEIVES,
    ROLE_AGENT_SENDS,
    BulkReceiver,
    BulkSender,
    DataLinkError,
    dial,
)
from batuta.transport.growing import Growing
from batuta.transport.tls import format_address

Deliver = Callable[[], None]  # take the messages the link completed (Agent._take_messages)
Fail = Callable[..., None]  # Agent._fail(message, send_error=True)
Warn = Callable[[str], None]


class AgentDataLink:
    """Both directions of one agent's data link, once the coordinator offers one."""

    def __init__(self, conn: Connection, deliver: Deliver, fail: Fail, warn: Warn) -> None:
        self._conn = conn
        self._deliver = deliver
        self._fail = fail
        self._warn = warn
        self._where = ""
        self._offered = False
        self._closed = False
        self._sender: BulkSender | None = None
        self._receiver = BulkReceiver("coordinator", eof_fails=False)
        self._growing: dict[tuple[int, int], Growing] = {}  # (address, bytes) of arrays still arriving

    @property
    def sending(self) -> bool:
        """Whether streamed arrays from here go over the link now."""
        return self._sender is not None and not self._closed and self._conn.outgoing.divert is not None

    def forwards(self, flats: list[np.ndarray]) -> bool:
        """Whether arrays still being filled can go now (`agent/forward.py`): the link sends,
        and each is large enough to be streamed, never copied into its frame half-filled."""
        return self.sending and all(f.nbytes >= self._conn.outgoing.stream_min_bytes for f in flats)

    @contextlib.contextmanager
    def growing(self, arrays: list[tuple[np.ndarray, Growing]]) -> Iterator[None]:
        """While messages are encoded: these arrays, if they stream, go piece by piece."""
        self._growing = {(_address(flat), flat.nbytes): growing for flat, growing in arrays}
        try:
            yield
        finally:
            self._growing = {}

    def _divert(self, stream_id: int, view: memoryview) -> None:
        assert self._sender is not None
        growing = self._growing.get((_address(view), len(view))) if self._growing else None
        self._sender.send(stream_id, view, growing)

    def offered(self, offer: DataLink) -> None:
        """Dial the listener `offer` names (the first offer only: one link a session)."""
        if self._offered:
            return
        self._offered = True
        self._where = format_address(offer.host, offer.port)
        self._loop = asyncio.get_running_loop()
        # From now on the coordinator may move a stream's bytes to the link: learn of every
        # stream it announces (those below its first id are forgotten once that is known).
        self._conn.incoming.on_open = self._receiver.expect
        for role in (ROLE_AGENT_RECEIVES, ROLE_AGENT_SENDS):
            dialling = functools.partial(dial, encrypted=offer.encryption != "none")
            dialled = self._loop.run_in_executor(
                None, dialling, offer.host, offer.port, offer.token, offer.fingerprint, role, HANDSHAKE_TIMEOUT_S
            )
            dialled.add_done_callback(functools.partial(self._dialled, role))

    def _dialled(self, role: bytes, done: asyncio.Future[Any]) -> None:
        receives = role == ROLE_AGENT_RECEIVES
        try:
            sock = done.result()
        except (DataLinkError, OSError) as exc:
            way = "to" if receives else "from"
            self._warn(f"data link {self._where}: {exc}; values {way} this host go over the SSH channel")
            if receives:
                self._conn.incoming.on_open = None
                self._receiver.close()
            return
        if self._closed:
            sock.close()
            return
        if receives:
            self._receiver.start(sock, self._loop, self._filled, self._failed)  # the coordinator never aborts
        else:
            self._sender = BulkSender(sock, self._conn.outgoing.next_id, self._loop, self._failed, "coordinator")
            self._conn.outgoing.divert = self._divert

    def _filled(self, stream_id: int, nbytes: int) -> None:
        if self._closed:
            return
        try:
            done = self._conn.incoming.filled_elsewhere(stream_id, nbytes)
        except RemoteProtocolError as exc:
            self._failed(str(exc))
            return
        if done:
            self._deliver()

    def _failed(self, reason: str) -> None:
        if self._closed:
            return
        self.close()
        self._fail(f"data link {self._where} broke: {reason}", send_error=True)

    def close(self) -> None:
        self._closed = True
        self._conn.outgoing.divert = None
        self._conn.incoming.on_open = None
        self._receiver.close()
        if self._sender is not None:
            self._sender.close()


def _address(buffer: np.ndarray | memoryview) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])
