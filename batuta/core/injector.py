"""The injector: tasks not yet given to a slot, one priority heap per capability class.

Functions of the scheduler whose tables they move (friends of the class, as in
`batuta.core.stealing`): a task is pushed when it is submitted, requeued or handed back, and
taken from the heap of the best class a slot can run, one task at a time or a fair share at
once into the slot's deque (`grab`). Heaps are lazy: a task that left the injector (given to a
slot, cancelled) stays in its heap until it reaches the top, recognised as stale by its
`token`, which every push increments; `CapabilityClass.live` counts the others.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from batuta.core.placement import CapabilityClass, Place, SlotRecord, TaskEntry

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler

NO_PRIORITY = -(1 << 62)  # below any task's


def push(scheduler: Scheduler, entry: TaskEntry, klass: CapabilityClass) -> None:
    """`entry` waits in `klass`'s heap, owned by no slot."""
    entry.place = Place.INJECTOR
    entry.slot = None
    entry.home = entry.home_slot = None
    entry.token += 1
    klass.live += 1
    scheduler._queued += 1
    heapq.heappush(klass.heap, (-entry.priority, entry.seq, entry.token, entry))


def pop(scheduler: Scheduler, klass: CapabilityClass) -> TaskEntry | None:
    """The most urgent (then oldest) task of `klass`, out of the injector; None if it holds none."""
    heap = klass.heap
    while heap:
        _neg, _seq, token, entry = heapq.heappop(heap)
        if entry.place is Place.INJECTOR and entry.token == token:
            klass.live -= 1
            scheduler._queued -= 1
            return entry
    return None


def head_priority(klass: CapabilityClass) -> int:
    """The priority of `klass`'s most urgent task (stale tops dropped on the way)."""
    heap = klass.heap
    while heap:
        neg_priority, _seq, token, entry = heap[0]
        if entry.place is Place.INJECTOR and entry.token == token:
            return -neg_priority
        heapq.heappop(heap)
    return NO_PRIORITY


def best_class(scheduler: Scheduler, slot: SlotRecord) -> CapabilityClass | None:
    """The class `slot` can run whose head is the most urgent; None if none holds a task."""
    best: CapabilityClass | None = None
    best_priority = NO_PRIORITY
    for klass in scheduler._classes.values():
        if klass.live and klass.requires <= slot.capabilities:
            priority = head_priority(klass)
            if priority > best_priority:
                best, best_priority = klass, priority
    return best


def grab(scheduler: Scheduler, slot: SlotRecord, klass: CapabilityClass) -> None:
    """Move a fair share of the class's injector tasks into the slot's deque (they stay queued:
    `_queued` counts both)."""
    count = min(klass.live // max(klass.eligible, 1) + 1, scheduler.config.grab_max, klass.live)
    heap = klass.heap
    while count > 0 and heap:
        _neg, _seq, token, entry = heapq.heappop(heap)
        if entry.place is not Place.INJECTOR or entry.token != token:
            continue
        klass.live -= 1
        entry.place = Place.DEQUE
        entry.slot = slot
        slot.deque.append(entry)
        scheduler._top_priority = max(scheduler._top_priority, entry.priority)
        count -= 1
    if slot.deque:
        scheduler._deque_holders.add(slot)
