"""The protocol's errors, split by whose fault it is (as in h11).

`LocalProtocolError`: this side misused the protocol (sent a message in the wrong state or
direction, or a value the wire cannot carry). `RemoteProtocolError`: the peer did (garbage,
a bad field, a message it may not send). Both name what was wrong, in one line.
"""

from __future__ import annotations

from batuta.errors import BatutaError

__all__ = ["CutShortError", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(BatutaError):
    """The coordinator <-> agent byte stream broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol forbids (a wrong message, an unsendable value)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (garbage, a wrong message, a bad field)."""


class CutShortError(RemoteProtocolError):
    """The stream ended inside a frame or a streamed array: the peer was killed or closed it
    mid-transfer (a Ctrl-C while a value was on its way), not a malformed message. An agent
    takes it as the end of its coordinator, as it takes a clean end of stream."""
