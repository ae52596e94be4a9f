"""The kernels `scripts/timeline.py` ships to its local pool: busy-waits that say when they ran."""

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


def burn_t(seconds: float) -> tuple[float, float, int]:
    """Burn `seconds` of this thread's CPU time (as the built-in `burn`): CPU that another
    process takes from it meanwhile makes it end later, as it would a real kernel."""
    start = time.perf_counter()
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return start, time.perf_counter(), os.getpid()


kernel("spin_t", description="spin, returning (start, end, pid)")(spin_t)
kernel("burn_t", description="burn, returning (start, end, pid)")(burn_t)
