"""An array still being filled, that a data link sends as its bytes arrive.

A value the agent fetches from a slot's process arrives down that slot's pipe into an array
of the agent's; the agent forwards it to the coordinator while it arrives (`agent/forward.py`)
instead of after the whole value, so the two hops overlap. The data link's sending thread
(`transport/bulk.py`) sends what is filled so far and waits for more; the event loop says
how far the array is filled (`advance`), or that its source died part-way (`abort`), in which
case the link tells the receiver so and the receiver forgets the message that named it.
A lent array (`agent/lend.py`) is a growing array all there at once whose pieces the
sending thread reads from elsewhere (`piece`).
"""

from __future__ import annotations

import threading

__all__ = ["Growing"]


class Growing:
    """How far one array of `nbytes` is filled, shared between the loop and a sending thread."""

    __slots__ = ("_cond", "aborted", "filled", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.filled = 0
        self.aborted = False
        self._cond = threading.Condition()

    @property
    def complete(self) -> bool:
        return self.filled >= self.nbytes

    def advance(self, filled: int) -> None:
        """The first `filled` bytes are in (never goes back)."""
        with self._cond:
            if filled > self.filled:
                self.filled = min(filled, self.nbytes)
                self._cond.notify_all()

    def abort(self) -> None:
        """The rest will never come: a sender stops at what it sent and says so."""
        with self._cond:
            self.aborted = True
            self._cond.notify_all()

    def piece(self, view: memoryview, start: int, end: int) -> memoryview:
        """The bytes to send for `start:end` of the array (fewer, for a source that reads its
        bytes from elsewhere: `agent/lend.py`); OSError if they cannot be had."""
        return view[start:end]

    def wait_beyond(self, sent: int, timeout: float) -> int:
        """How far the array is filled once it is beyond `sent` bytes, or aborted (-1), or
        `sent` itself when `timeout` seconds passed first (the caller checks its own state)."""
        with self._cond:
            self._cond.wait_for(lambda: self.aborted or self.filled > sent, timeout)
            if self.aborted:
                return -1
            return self.filled
