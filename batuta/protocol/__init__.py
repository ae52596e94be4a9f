"""Protocol: sans-I/O framing and codec for the coordinator <-> host agent byte stream.

`messages` holds the message dataclasses, `codec` turns them into length-prefixed msgpack
frames and back (`encode_message`, `FrameDecoder`), and `connection` is the h11-style state
machine over one stream (`Connection`: `receive_data`, `next_event`, `send`). Nothing here
touches a socket or an event loop.
"""

from __future__ import annotations

from batuta.protocol.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    TAGS,
    FrameDecoder,
    check_value,
    encode_message,
    encode_messages,
)
from batuta.protocol.connection import (
    CLOSED,
    NEED_DATA,
    Connection,
    ConnectionState,
    Phase,
    Role,
    Sentinel,
)
from batuta.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    SLOT_DOWN,
    SLOT_RESTARTING,
    SLOT_UP,
    Bye,
    Cancel,
    Done,
    Drop,
    Error,
    GpuInfo,
    GpuSample,
    Heartbeat,
    Hello,
    Message,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    SlotInfo,
    Started,
    StealBack,
    StealBackReply,
    TaskOutcome,
    TaskRequest,
    Welcome,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SLOT_DOWN",
    "SLOT_RESTARTING",
    "SLOT_UP",
    "TAGS",
    "Bye",
    "Cancel",
    "Connection",
    "ConnectionState",
    "Done",
    "Drop",
    "Error",
    "FrameDecoder",
    "GpuInfo",
    "GpuSample",
    "Heartbeat",
    "Hello",
    "LocalProtocolError",
    "Message",
    "Phase",
    "ProtocolError",
    "Put",
    "RemoteProtocolError",
    "Role",
    "Run",
    "Sentinel",
    "Shutdown",
    "SlotChanged",
    "SlotInfo",
    "Started",
    "StealBack",
    "StealBackReply",
    "TaskOutcome",
    "TaskRequest",
    "Welcome",
    "check_value",
    "encode_message",
    "encode_messages",
]
