"""When to draw a frame: every tick, or fewer while the coordinator is flat out (no Textual).

The pool runs on the app's event loop, so the dashboard must never compete with it for
long. `RefreshPace` is the policy, kept apart from the app so that it can be read and
tested on its own.
"""

from __future__ import annotations

import time

SATURATED_BUSY = 0.85  # the loop's thread this busy (coordinator and app together) is saturated...
RELAXED_BUSY = 0.6  # ...until it is back under this
FLOOD_EVENTS_PER_S = 20_000  # or this many events a second reach a dashboard that has no pool of its own
# ...or this many from a pool on the app's own loop (about one per short task: starts are coalesced)
POOL_FLOOD_EVENTS_PER_S = 1_000
SATURATED_REFRESH_HZ = 2.0  # refresh rate while saturated: the coordinator's work comes first
PACE_WINDOW_S = 0.25


class RefreshPace:
    """Slows the refresh while the coordinator is flat out.

    The pool runs on the app's loop, so while it is already using all the CPU it can get,
    every frame the dashboard draws is throughput the pool loses. Four times a second this
    looks at two signs: the loop thread's CPU time against the wall time (the loop is busy),
    and the rate of pool events (the pool is flooding, which also catches a coordinator
    starved of CPU by other processes, whose thread is not "busy" by its own clock). While
    either holds, frames are drawn at `SATURATED_REFRESH_HZ`; the model still folds every
    event each tick, and actions (a key, a click) still redraw at once.

    The flood threshold is a rate the frames cannot push the pool under. A frame (tens of
    milliseconds) holds the loop longer than the window of work a slot running short tasks
    has queued, so frames drawn at every tick slow such a pool down, and a pool slowed under
    the threshold would never be seen to flood: a dashboard with its pool on the same loop
    uses `POOL_FLOOD_EVENTS_PER_S` (`flood_events_per_s`): a thousand tasks a second are
    short tasks on any cluster, and measured on two shared cores, frames at every tick held
    such a pool at 3,000-5,000 tasks a second (about one event each, task starts being
    coalesced), under the 20,000 events a second that a pool alone floods it with.
    """

    def __init__(self, flood_events_per_s: float = FLOOD_EVENTS_PER_S) -> None:
        self.saturated = False
        self.flood_events_per_s = flood_events_per_s
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()
        self._events = 0
        self._last_frame = 0.0

    def frame_due(self, now: float, events: int) -> bool:
        """Count `events` folded this tick; True when a frame should be drawn now."""
        self._events += events
        elapsed = now - self._wall
        if elapsed >= PACE_WINDOW_S:
            cpu = time.thread_time()
            busy = (cpu - self._cpu) / elapsed
            flood = self._events / elapsed >= self.flood_events_per_s
            self._wall, self._cpu, self._events = now, cpu, 0
            if busy >= SATURATED_BUSY or flood:
                self.saturated = True
            elif busy < RELAXED_BUSY:
                self.saturated = False
        if self.saturated and now - self._last_frame < 1.0 / SATURATED_REFRESH_HZ:
            return False
        self._last_frame = now
        return True
