"""The coordinator's garbage-collector policy: a long-lived server's, held while a pool runs.

CPython's full (generation 2) collection walks every tracked object in the process, and the
event loop waits meanwhile: its pause is the loop's lag. A coordinator's heap is mostly
what start-up made and never frees (modules, every host's session, decoder and reader
task) plus the tasks in flight; its steady work makes no cyclic garbage (each task's
objects, messages and events die by reference count: `tests/test_collector.py` checks a
pool's load leaves none). Measured with `bench/many_hosts.py`, 256 local hosts on
h200-16core: three full collections during 20,000 tasks of 194, 55 and 36 ms, which found
617 objects to free between them.

So once a pool's hosts are up, `hold()`:

* collects once (what start-up left), then `gc.freeze()`s the heap: frozen objects sit in
  the permanent generation, which no collection walks. They are still freed by reference
  count when they die; only a cycle among them waits until the last pool closes, when
  `release()` unfreezes (and the next full collection takes it).
* raises the young generation's threshold from 700 to `YOUNG_THRESHOLD` allocations: the
  objects of the tasks in flight live for a round trip, so most survive 700 allocations and
  are promoted anyway, and each promotion counts towards the next full collection.

It is applied only where the process runs the interpreter's own policy: if the user disabled
the collector or set their own thresholds (a library's host process tuned for its own
work), `hold()` changes nothing. Pools may overlap: the first `hold()` applies the policy,
each later one freezes what its start-up added, and the last `release()` restores the
thresholds (unless the user changed them meanwhile) and unfreezes.
"""

from __future__ import annotations

import gc

DEFAULT_THRESHOLDS = (700, 10, 10)  # CPython's own; anything else was someone's choice
YOUNG_THRESHOLD = 10_000  # allocations between young collections while a pool runs


class CollectorPolicy:
    """The process's collector settings while pools run (one per process: `POLICY`)."""

    def __init__(self) -> None:
        self.holders = 0  # pools that hold the policy now
        self.applied = False  # the policy is in force (the user's own settings were the defaults)
        self._thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS  # to restore at the last release

    def hold(self) -> None:
        """A pool's hosts are up: freeze the start-up heap and set the server thresholds,
        unless the user runs their own collector settings (see the module docstring)."""
        self.holders += 1
        if self.holders == 1:
            self.applied = gc.isenabled() and gc.get_threshold() == DEFAULT_THRESHOLDS
            if self.applied:
                self._thresholds = gc.get_threshold()
        if not self.applied:
            return
        gc.collect()  # garbage frozen now would outlive every pool
        gc.freeze()
        young, middle, old = self._thresholds
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)

    def release(self) -> None:
        """A pool closed; the last one gives the process its collector back."""
        if self.holders == 0:
            return
        self.holders -= 1
        if self.holders or not self.applied:
            return
        self.applied = False
        young, middle, old = self._thresholds
        if gc.get_threshold() == (max(young, YOUNG_THRESHOLD), middle, old):  # else the user took over
            gc.set_threshold(young, middle, old)
        gc.unfreeze()


POLICY = CollectorPolicy()
