"""Message tags on the wire, and the two kinds of call: shared by `_wire.py` and its parts."""

from __future__ import annotations

from batuta.protocol.messages import (
    Bye,
    Cancel,
    Code,
    CodeLoaded,
    CodeStored,
    DataLink,
    Done,
    Drop,
    Error,
    Fetch,
    GpuCache,
    Heartbeat,
    Hello,
    Keepalive,
    ObjectsLost,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    Started,
    StealBack,
    StealBackReply,
    Welcome,
)

TAGS: dict[type, int] = {
    Hello: 1,
    Welcome: 2,
    Run: 3,
    Started: 4,
    Done: 5,
    StealBack: 6,
    StealBackReply: 7,
    Cancel: 8,
    SlotChanged: 9,
    Heartbeat: 10,
    Shutdown: 11,
    Bye: 12,
    Error: 13,
    Put: 14,
    Drop: 15,
    Code: 16,
    CodeLoaded: 17,
    Fetch: 18,
    ObjectsLost: 19,
    GpuCache: 20,
    CodeStored: 21,
    DataLink: 23,
    Keepalive: 24,
}
"""Message tags on the wire. Stable: changing one needs a new PROTOCOL_VERSION."""

CALL_KERNEL = 0
CALL_BINARY = 1
