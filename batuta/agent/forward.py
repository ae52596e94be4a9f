"""Fetched values forwarded to the coordinator while they still arrive from their slot.

A kept result lives in the slot process that made it (`objects.py`); a `Fetch` for it asks
that slot, whose answer (a `Put`) comes down its pipe into arrays of the agent's. Waiting for
the whole value before sending it on would run the two hops (slot to agent, agent to
coordinator) one after the other. Instead, once the Put's frame has come (its arrays are
allocated, their bytes still to come), the agent answers the Fetch at once with that value
(`Forwarded`, a Done of its own), and its data link sends each array as it fills
(`transport/growing.py`, `transport/bulk.py`): the hops overlap. Only over a data link: the
channel's chunk frames have no way to take half a value back.

If the slot's process goes before the value is whole (killed, crashed, a bad frame), every
array still growing is aborted (`PipeWatch.abort`): the link tells the coordinator, which
forgets that Done without handing anything on, and the agent answers the Fetch again, as an
error, after reporting the objects lost (`ObjectsLost`), so `pool.get` waits for the value's
lineage to make it again. A Forwarded Done that has not gone out when that happens is
dropped (`Forwarded.sendable`).

Over a data link the agent first asks the slot to lend the value instead (`lend.py`): its
arrays are then forwarded the same way, as growing arrays whose pieces are read from the
slot's memory rather than from arrays of the agent's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batuta.protocol.chunks import StreamAssembler
from batuta.protocol.messages import Done, Message, Put
from batuta.transport.growing import Growing

__all__ = ["Forwarded", "PipeWatch"]

Arriving = Callable[[int, Put, list[np.ndarray], list[Growing]], bool]
"""(slot, the Put, its arrays, how far each is filled): whether the agent forwards it now."""


class Forwarded:
    """An outbox item: a Fetch answered with a value whose arrays may still be growing."""

    __slots__ = ("done", "flats", "growing")

    def __init__(self, done: Done, flats: list[np.ndarray], growing: list[Growing]) -> None:
        self.done = done
        self.flats = flats
        self.growing = growing

    @property
    def sendable(self) -> bool:
        """False once its source died: the Done must never go out with half a value."""
        return not any(g.aborted for g in self.growing)

    @property
    def still_growing(self) -> list[tuple[np.ndarray, Growing]]:
        return [(f, g) for f, g in zip(self.flats, self.growing, strict=True) if not g.complete]


class PipeWatch:
    """One slot process's pipe, as its decoder's stream hooks see it: the Puts that wait for
    their arrays, and how far each array is filled."""

    __slots__ = ("_arriving", "_growing", "slot")

    def __init__(self, slot: int, streams: StreamAssembler, arriving: Arriving) -> None:
        self.slot = slot
        self._arriving = arriving
        self._growing: dict[int, Growing] = {}  # stream id -> its array's fill, while forwarded
        streams.on_held = self._held
        streams.on_progress = self._progress

    @property
    def growing(self) -> int:
        """Arrays forwarded and not yet whole (what a test checks is back to zero)."""
        return len(self._growing)

    def _held(self, message: Message, opened: list[tuple[int, np.ndarray]]) -> None:
        if not isinstance(message, Put):
            return  # a task's result: the coordinator gets it whole, as before
        growing = [Growing(flat.nbytes) for _, flat in opened]
        if self._arriving(self.slot, message, [flat for _, flat in opened], growing):
            self._growing.update((stream_id, g) for (stream_id, _), g in zip(opened, growing, strict=True))

    def _progress(self, stream_id: int, filled: int) -> None:
        growing = self._growing.get(stream_id)
        if growing is None:
            return
        growing.advance(filled)
        if growing.complete:
            del self._growing[stream_id]

    def abort(self) -> None:
        """The process is gone: what it was still sending never comes."""
        for growing in self._growing.values():
            growing.abort()
        self._growing.clear()
