"""The kernel `scripts/timeline.py` ships to its local pool: a busy-wait that says when it ran."""

from __future__ import annotations

import os
import time

from batuta import kernel


def spin_t(seconds: float) -> tuple[float, float, int]:
    """Busy-wait `seconds` of wall time; (start, end) on the monotonic clock every process of
    the machine shares, and the process that ran it."""
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        pass
    return start, time.perf_counter(), os.getpid()


kernel("spin_t", description="spin, returning (start, end, pid)")(spin_t)
