"""The coordinator's data links: big arrays to and from hosts beside their streams.

A host whose spec has a `data_link` setting (the cluster file's `[ssh] data_link`) is offered
one once its session is up (`DataLinks.offer`): a `DataLink` message on its stream names a
listener of ours, a one-time token and the listener's certificate fingerprint; the agent
dials twice (one connection per direction, `transport/bulk.py`), and from then on streamed
arrays travel there instead of as chunk frames on the stream. Each direction comes up on its
own; until it does, or if it never does, that direction's arrays use the stream as before.

Listeners are opened on first use, one per address: the local address of each host's SSH
connection (`data_link = "ssh"`), or the configured one. Nothing listens unless the cluster
file asks. With `data_link_encryption = "none"` the listener speaks plain TCP (both ends
still prove the token: `transport/linkauth.py`) and the offer says so. Why a host is left on
its stream (no address, a listener that cannot bind, an agent that did not dial) is logged
once per host and reason.

A data link that breaks while the session lives ends the session (`HostSession.kill`), as a
lost stream would: its tasks are requeued and the host relaunched; half a value is never
resumed. A value the agent forwards while it still arrives from a slot, whose slot dies
part-way, is aborted on the link alone: its message is forgotten and the agent answers it
again (an error; `pool.get` then waits for the value's lineage to make it again).
A session that ends closes its link (`HostSession.data_link`); one that closes does so once
its agent has gone, and what the link does meanwhile (its agent's end closing) is no break.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from batuta.protocol import messages as m
from batuta.protocol.connection import Connection
from batuta.protocol.errors import RemoteProtocolError
from batuta.runtime.session import HostSession
from batuta.transport.bulk import (
    ROLE_AGENT_RECEIVES,
    ROLE_AGENT_SENDS,
    BulkReceiver,
    BulkSender,
    DataListener,
    new_token,
)
from batuta.transport.datalink_setting import DataLinkSetting
from batuta.transport.tls import format_address

log = logging.getLogger("batuta.runtime.datalink")

DIAL_WAIT_S = 30.0  # after the offer, how long the agent has to dial both connections

_WILDCARDS = frozenset({"0.0.0.0", "::"})


class SessionLink:
    """One session's data link, from the offer until its stream ends."""

    def __init__(
        self, session: HostSession, conn: Connection, listener: DataListener, token: bytes, advertised: str
    ) -> None:
        self._session = session
        self._conn = conn
        self._listener = listener
        self._token = token
        self._where = format_address(advertised, listener.port)
        self._loop = asyncio.get_running_loop()
        self._roles: set[str] = set()  # directions claimed by a dialler with our token
        self._started = 0  # directions in use
        self._closed = False
        # Streams the agent announces from now on may come over the link: the receiver
        # learns of each (and forgets those below the agent's first id once it is known).
        self._receiver = BulkReceiver(session.name, eof_fails=True)
        conn.incoming.on_open = self._receiver.expect
        self._sender: BulkSender | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(DIAL_WAIT_S, self._dial_timed_out)
        listener.expect(token, self._accepted)

    @property
    def _over(self) -> bool:
        """Closed, or its session closing (it closes the link once the agent is gone)."""
        return self._closed or self._session.closing

    @property
    def directions(self) -> int:
        """How many of the two directions are in use."""
        return self._started

    @property
    def sending_bytes(self) -> int:
        return self._sender.pending_bytes if self._sender is not None else 0

    def _accepted(self, role: str, sock: Any) -> Callable[[], None] | None:
        """The listener's call: a dialler with our token (on the loop). Returns what starts
        that direction once the dialler has its answer; None refuses it."""
        if self._over or role in self._roles or self._session.connection is not self._conn:
            return None
        self._roles.add(role)
        if len(self._roles) == 2:
            self._listener.forget(self._token)
            self._cancel_timer()
        return functools.partial(self._start, role, sock)

    def _start(self, role: str, sock: Any) -> None:
        if self._closed:
            sock.close()
            return
        name = self._session.name
        if role == ROLE_AGENT_SENDS.decode():
            self._receiver.start(sock, self._loop, self._filled, self._failed, self._aborted)
        else:
            self._sender = BulkSender(sock, self._conn.outgoing.next_id, self._loop, self._failed, name)
            self._conn.outgoing.divert = self._sender.send
        self._started += 1
        if self._started == 2:
            log.info(
                "host %s: data link up (%s): big values travel beside the SSH channel",
                name,
                self._where,
                extra={"host": name},
            )

    def _filled(self, stream_id: int, nbytes: int) -> None:
        if self._over:
            return
        try:
            done = self._conn.incoming.filled_elsewhere(stream_id, nbytes)
        except RemoteProtocolError as exc:
            self._failed(str(exc))
            return
        if done:
            self._session.take_ready()

    def _aborted(self, stream_id: int) -> None:
        """The agent gave up a value it forwarded while it arrived (its slot died part-way):
        the message that named it is forgotten, never delivered; the agent answers it again
        on the stream (`agent/forward.py`)."""
        if self._over:
            return
        if self._conn.incoming.abort(stream_id):
            self._session.take_ready()  # what waited behind it goes on

    def _failed(self, reason: str) -> None:
        if self._over:
            return
        log.warning(
            "host %s: data link %s broke (%s); ending the session: its tasks are requeued and it is relaunched",
            self._session.name,
            self._where,
            reason,
        )
        self._session.kill()  # closes this link; the reader then sees the stream end

    def _dial_timed_out(self) -> None:
        self._timer = None
        if self._closed or len(self._roles) == 2:
            return
        self._listener.forget(self._token)
        missing = {ROLE_AGENT_SENDS.decode(), ROLE_AGENT_RECEIVES.decode()} - self._roles
        log.warning(
            "host %s: the agent did not dial data link %s within %gs (its own log says why); "
            "values %s go over the SSH channel",
            self._session.name,
            self._where,
            DIAL_WAIT_S,
            "from it and to it" if len(missing) == 2 else ("from it" if "U" in missing else "to it"),
        )
        if ROLE_AGENT_SENDS.decode() in missing:
            self._conn.incoming.on_open = None
            self._receiver.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """The session's stream ended: stop both directions (a transfer under way is cut)."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        self._listener.forget(self._token)
        if self._conn.incoming.on_open == self._receiver.expect:
            self._conn.incoming.on_open = None
        self._conn.outgoing.divert = None
        self._receiver.close()
        if self._sender is not None:
            self._sender.close()


class DataLinks:
    """A pool's data listeners and the offers made on them."""

    def __init__(self) -> None:
        self._listeners: dict[tuple[str, int, bool], DataListener] = {}  # (bind, port, encrypted)
        self._said: set[tuple[str, str]] = set()  # (host, reason) already logged
        self._closed = False

    def offer(self, session: HostSession) -> None:
        """Offer `session`'s agent a data link, if its spec asks for one (on the loop, once
        its Welcome is queued)."""
        setting = session.spec.data_link
        conn = session.connection
        if setting is None or conn is None or self._closed:
            return
        local = getattr(session.stream, "local_address", None)
        bind = local if setting.follows_ssh else setting.host
        if not bind:
            self._once(session.name, "no-address", "its SSH connection has no local address of ours (a jump host?)")
            return
        advertised = local if bind in _WILDCARDS else bind
        if not advertised:
            self._once(session.name, "wildcard", f"the listener binds {bind}, and the host's SSH address is unknown")
            return
        listener = self._listener(session.name, bind, setting)
        if listener is None:
            return
        token = new_token()
        link = SessionLink(session, conn, listener, token, advertised)
        session.data_link = link
        encryption = "tls" if listener.encrypted else "none"
        offer = m.DataLink(
            host=advertised, port=listener.port, token=token, fingerprint=listener.fingerprint, encryption=encryption
        )
        session.send(offer)

    def _listener(self, host_name: str, bind: str, setting: DataLinkSetting) -> DataListener | None:
        key = (bind, setting.port, setting.encrypted)
        listener = self._listeners.get(key)
        if listener is not None:
            return listener
        try:
            listener = DataListener(bind, setting.port, encrypted=setting.encrypted)
        except OSError as exc:
            where = format_address(bind, setting.port)
            self._once(host_name, f"bind {key}", f"cannot listen on {where}: {exc.strerror or exc}")
            return None
        listener.start()
        self._listeners[key] = listener
        how = "TLS" if setting.encrypted else "plain TCP, NOT encrypted (data_link_encryption = none)"
        log.info("data link listener on %s (%s, one-time tokens over each host's channel)", listener.where, how)
        return listener

    def _once(self, host: str, kind: str, why: str) -> None:
        if (host, kind) in self._said:
            return
        self._said.add((host, kind))
        log.warning("host %s: no data link: %s; big values go over the SSH channel", host, why, extra={"host": host})

    @property
    def listeners(self) -> list[DataListener]:
        return list(self._listeners.values())

    async def close(self) -> None:
        self._closed = True
        listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            await listener.close()
