"""Log lines for refused connections, rate-limited per source address: a listener that
turns strangers away (a worker's TLS port, the coordinator's data-link port) must not let a
flood of connections flood its log too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

OTHER_SOURCES = "other addresses"  # where RefusalLog counts sources past its limit


@dataclass(slots=True)
class _RefusalWindow:
    started: float
    count: int = 0
    timer: asyncio.TimerHandle | None = None


class RefusalLog:
    """WARNING lines for refused connections, rate-limited per source address.

    The first `burst` refusals from an address within `interval` seconds are logged as they
    happen; the rest are only counted, and when the interval ends one line sums them up
    ("N more refused from ADDR in the last Ts"). A flood of connections then costs at most
    `burst + 1` lines per address and interval instead of one per connection. At most
    `max_sources` addresses are tracked at once; refusals from further ones share one entry.
    """

    def __init__(self, logger: logging.Logger, *, burst: int, interval: float, max_sources: int = 256) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._max_sources = max_sources
        self._windows: dict[str, _RefusalWindow] = {}

    def refused(self, source: str, message: str, *args: object) -> None:
        """Log `message % args` unless `source` has used up its lines for this interval."""
        if source not in self._windows and len(self._windows) >= self._max_sources:
            source = OTHER_SOURCES
        window = self._windows.get(source)
        if window is None:
            window = _RefusalWindow(started=time.monotonic())
            with contextlib.suppress(RuntimeError):  # no running loop: summed up at close()
                loop = asyncio.get_running_loop()
                window.timer = loop.call_later(self._interval, self._end_window, source)
            self._windows[source] = window
        window.count += 1
        if window.count <= self._burst:
            self._log.warning(message, *args)

    def _end_window(self, source: str) -> None:
        window = self._windows.pop(source, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        unlogged = window.count - self._burst
        if unlogged > 0:
            elapsed = max(1.0, time.monotonic() - window.started)
            self._log.warning("%d more refused from %s in the last %.0fs", unlogged, source, elapsed)

    def close(self) -> None:
        """Sum up every open interval now (the daemon is stopping)."""
        for source in list(self._windows):
            self._end_window(source)


def address_of(peer: str) -> str:
    """The address of a "host:port" or "[v6]:port" peer: refusals are counted per address."""
    host, sep, _ = peer.rpartition(":")
    return host.strip("[]") if sep else peer
