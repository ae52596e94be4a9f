"""`WakeupTimer`: one loop timer that wakes a sans-I/O state machine when it asked to be woken.

The scheduler and host liveness both say when something will be due (`next_wakeup()`, on
the loop's clock) and are told when that time has come. This keeps exactly one timer armed
at the earliest such time, re-arming only when that time changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WakeupTimer:
    """Calls `on_due()` at the time `arm(when)` was last given (None: never)."""

    def __init__(self, on_due: Callable[[], None]) -> None:
        self._on_due = on_due
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None
        self._closed = False

    def arm(self, when: float | None) -> None:
        if when == self._at or self._closed:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = when
        if when is not None:
            self._handle = asyncio.get_running_loop().call_at(when, self._fire)

    def close(self) -> None:
        """Never fire again."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        if not self._closed:
            self._on_due()
