"""Suspected hosts: silent past `suspect_after`, not lost yet, and sent only what no other can run.

A host that stops answering (its agent stopped, a link dropping packets, a machine deep in
swap) is suspected first and lost `lost_after` seconds into its silence, and whatever was sent
to it meanwhile is lost with it. A retry of a lost host's task went to the least busy host,
and a silent one is idle as far as the coordinator can tell: the task waited out the silence
there, and its second loss was counted against it again (`recovery.py`). So while a host is
suspected its slots take only work that no slot of a host up and heard from can run (from
their deques and the injector), steal nothing, and ask no agent for work back; a retry looks
for a host heard from (`recovery.requeue`). Once the host is heard from again its slots fill
as before; if it is lost, its work is requeued as for any loss.

Functions of the scheduler whose tables they read, as `stealing.py` is: the scheduler keeps
the suspected hosts in `_suspected`, which is empty, and costs nothing, while every host answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batuta.core import injector
from batuta.core.events import HostSuspected
from batuta.core.placement import CapabilityClass, SlotRecord, SlotState, TaskEntry

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def on_suspected(scheduler: Scheduler, ev: HostSuspected) -> None:
    """The host went silent, or was heard from again: then its slots with room fill at once."""
    if not ev.heard_again:
        scheduler._suspected.add(ev.host_id)
        return
    if ev.host_id not in scheduler._suspected:
        return
    scheduler._suspected.discard(ev.host_id)
    for slot in scheduler._host_slots.get(ev.host_id, ()):
        if slot.state is SlotState.UP:
            if len(slot.window) < slot.window_limit:
                scheduler._hungry.add(slot)
            scheduler._fill(slot)


def runs_elsewhere(scheduler: Scheduler, requires: frozenset[str]) -> bool:
    """Whether an up slot of a host that is not suspected can run work needing `requires`. A
    scan of the suspected hosts' slots only: there are few, and none while every host answers."""
    silent = sum(
        1
        for host_id in scheduler._suspected
        for slot in scheduler._host_slots.get(host_id, ())
        if slot.state is SlotState.UP and requires <= slot.capabilities
    )
    return scheduler._class_of(requires).eligible > silent


def next_for(scheduler: Scheduler, slot: SlotRecord) -> TaskEntry | None:
    """What the suspected `slot` may take: the head of its deque, else the most urgent task of
    the injector, that no host heard from can run; None otherwise (it steals nothing). What its
    deque holds that others can run waits there for them to steal, or for it to answer."""
    own = slot.deque
    if own and not runs_elsewhere(scheduler, own[0].requires):
        scheduler._queued -= 1
        return own.popleft()
    best: CapabilityClass | None = None
    best_priority = injector.NO_PRIORITY
    for klass in scheduler._classes.values():
        if klass.live and klass.requires <= slot.capabilities and not runs_elsewhere(scheduler, klass.requires):
            priority = injector.head_priority(klass)
            if priority > best_priority:
                best, best_priority = klass, priority
    return injector.pop(scheduler, best) if best is not None else None
