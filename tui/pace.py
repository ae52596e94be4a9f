"""When to draw a frame: every tick, or fewer while the coordinator is flat out (no Textual).

The pool runs on the app's event loop, so the dashboard must never compete with it for
long. `RefreshPace` is the policy, kept apart from the app so that it can be read and
tested on its own.
"""

from __future__ import annotations

import time

SATURATED_BUSY = 0.85  # the loop's thread this busy (coordinator and app together) is saturated...
RELAXED_BUSY = 0.6  # ...until it is back under this
FLOOD_EVENTS_PER_S = 20_000  # or this many pool events a second: a coordinator at full tilt
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
    """

    def __init__(self) -> None:
        self.saturated = False
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
            flood = self._events / elapsed >= FLOOD_EVENTS_PER_S
            self._wall, self._cpu, self._events = now, cpu, 0
            if busy >= SATURATED_BUSY or flood:
                self.saturated = True
            elif busy < RELAXED_BUSY:
                self.saturated = False
        if self.saturated and now - self._last_frame < 1.0 / SATURATED_REFRESH_HZ:
            return False
        self._last_frame = now
        return True
