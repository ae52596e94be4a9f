"""How long a host's slot waits between finishing a task and receiving the next: the round trip.

The scheduler sizes each slot's window to hide it (`1 + ceil(round_trip / mean run time)`
tasks, `core/scheduler.py`), from `RoundTripMeasured` events; until one arrives it assumes
`SchedulerConfig.default_round_trip` (1 ms). A window sized for 1 ms starves a slot behind an
SSH link of 20 ms, and a GPU slot's 35 µs tasks behind a virtualised host's 2 ms pipes.

Each result gives a sample at no cost: the time from sending its task to receiving its
outcome, less the run time the agent reported. That is the round trip, plus whatever the
task waited in its slot behind the tasks sent before it. The smallest sample of a batch is
the round trip of a task that did not wait (as TCP's minimum RTT filters queueing delay):
one estimate per `BATCH` results, the first sooner, reported only when it moved by more
than a quarter (and `MIN_CHANGE_S`), so the scheduler is not told every jitter.
"""

from __future__ import annotations

import math

__all__ = ["RoundTripMeter"]

FIRST_BATCH = 8  # results before the first estimate: a fresh host reports one quickly
BATCH = 64  # results per estimate afterwards: a batch's minimum sheds queueing delay
MIN_CHANGE_S = 50e-6  # smaller moves are not worth resizing windows for
RELATIVE_CHANGE = 0.25


class RoundTripMeter:
    """One host's round trip, estimated from its results (see the module text)."""

    __slots__ = ("_count", "_low", "reported")

    def __init__(self) -> None:
        self.reported: float | None = None  # the last estimate handed to the scheduler
        self._low = math.inf
        self._count = 0

    def sample(self, sent_at: float, received_at: float, run_s: float) -> float | None:
        """Take one result's times; return a new estimate to report, or None."""
        self._low = min(self._low, max(0.0, received_at - sent_at - max(0.0, run_s)))
        self._count += 1
        if self._count < (FIRST_BATCH if self.reported is None else BATCH):
            return None
        estimate, self._low, self._count = self._low, math.inf, 0
        last = self.reported
        if last is not None and abs(estimate - last) <= max(MIN_CHANGE_S, RELATIVE_CHANGE * last):
            return None
        self.reported = estimate
        return estimate
