"""Losing a slot and what follows: requeues, retries, lost and unschedulable tasks.

The rules are in `batuta.core.scheduler`'s docstring ("Attempts count starts", "Capability
matching"); these functions carry them out as friends of the scheduler whose tables they
move, as `stealing.py` does for work stealing, so that the scheduler's module holds the
event handlers and the filling of windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batuta.core import deps, feedahead, hostfit, injector
from batuta.core.events import AnnounceRequeue
from batuta.core.placement import CapabilityClass, Place, SlotRecord, SlotState, TaskEntry
from batuta.core.stealing import end_steal_back
from batuta.core.task import CAP_CPU, CAP_GPU, TaskStatus

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def lose_slots(
    scheduler: Scheduler, slots: list[SlotRecord], reason: str, retired: bool, *, handed_back: bool = False
) -> None:
    """`slots` are gone (lost, or retired for good; a host's, together): each deque goes back
    to the injector, and each task in their windows is requeued, retried, or lost as the
    attempt rules say. Every one of them is marked gone before any task is requeued: a task
    requeued from the first was fed to the next, still up, and lost again with it, so that
    a host of 8 slots lost a waiting task 8 times in one loss (and failed it as lost)."""
    gone = []
    for slot in slots:
        if slot.state in (SlotState.LOST, SlotState.RETIRED):
            if retired:
                scheduler._set_state(slot, SlotState.RETIRED)
                scheduler._capability_epoch += 1
            continue
        scheduler._set_state(slot, SlotState.RETIRED if retired else SlotState.LOST)
        scheduler._capability_epoch += 1
        scheduler._hungry.discard(slot)
        scheduler._sends.pop(slot.slot_id, None)
        scheduler._made_ahead.pop(slot.slot_id, None)
        gone.append(slot)
    for slot in gone:
        _requeue_from(scheduler, slot, reason, retired, handed_back)


def lose_slot(scheduler: Scheduler, slot: SlotRecord, reason: str, retired: bool, *, handed_back: bool = False) -> None:
    """`lose_slots` for one slot; `handed_back`: its agent says none of its tasks had started."""
    lose_slots(scheduler, [slot], reason, retired, handed_back=handed_back)


def _requeue_from(scheduler: Scheduler, slot: SlotRecord, reason: str, retired: bool, handed_back: bool) -> None:
    requeue_deque(scheduler, slot)
    for entry in list(slot.window.values()):
        del slot.window[entry.task_id]
        entry.slot = None
        if entry.steal_pending:
            end_steal_back(scheduler, entry)
        if entry.resolved:
            entry.place = Place.GONE
            del scheduler._tasks[entry.task_id]
            continue
        if entry.started and entry.max_attempts == 1:  # not "its worker died on all 1 attempts"
            why = f"was running on {slot.host_id} when it was lost; not retried because retry=False"
            scheduler._resolve(entry, TaskStatus.LOST, f"{why} ({slot.slot_id} lost: {reason})", slot_id=slot.slot_id)
        elif entry.started:
            retry_or_lose(scheduler, entry, slot, f"{slot.slot_id} lost: {reason}")
        elif entry.max_attempts == 1 and not handed_back:
            # Its Started may still have been on the way: a task not safe to repeat is
            # lost here, never requeued as "never started" and run a second time.
            why = f"may have run on {slot.host_id}; not retried because retry=False ({slot.slot_id} lost: {reason})"
            scheduler._resolve(entry, TaskStatus.LOST, why, slot_id=slot.slot_id)
        elif not retired and lost_too_often_unstarted(scheduler, entry, slot, reason):
            continue  # resolved there, naming why
        else:
            entry.attempts -= 1  # it never started there
            requeue(scheduler, entry, slot, f"{slot.slot_id} lost before it started: {reason}")
    # thieves waiting on steal-backs from this slot get nothing back: let them look again
    for task_id, thief in scheduler._steal_thief.items():
        if thief is slot:
            scheduler._steal_thief[task_id] = None  # returned tasks will go to the injector
    slot.steal_backs_pending = 0
    if slot.host_id in scheduler._draining:
        scheduler._check_drained(slot.host_id)


UNSTARTED_LOSSES_OVER_ATTEMPTS = 2
"""A task that has not started may wait through `max_attempts` + this many host losses."""


def lost_too_often_unstarted(scheduler: Scheduler, entry: TaskEntry, slot: SlotRecord, reason: str) -> bool:
    """Resolve LOST, and say so, a task whose slot went down under it once too often before
    it started: the task itself may be what brings its host down (an argument the host
    cannot hold gets its agent killed while it arrives), and requeued without limit it would
    take down every host it is sent to, for ever. Like Dask's `allowed-failures`, counted for
    every task waiting there; allowed more than started attempts, since most of those waiting
    with it are bystanders."""
    entry.unstarted_losses += 1
    allowed = entry.max_attempts + UNSTARTED_LOSSES_OVER_ATTEMPTS
    if entry.unstarted_losses < allowed:
        return False
    why = (
        f"its host went down {entry.unstarted_losses} times while it waited there, before it started "
        f"(last: {slot.slot_id} lost: {reason}); the task itself may be what brings the host down, "
        f"such as an argument larger than the host's memory (max_attempts={entry.max_attempts} allows "
        f"{allowed} such losses)"
    )
    scheduler._resolve(entry, TaskStatus.LOST, why, slot_id=slot.slot_id)
    return True


def retry_or_lose(scheduler: Scheduler, entry: TaskEntry, slot: SlotRecord, reason: str) -> None:
    """A started attempt died under `entry`: run it again, unless that was its last attempt."""
    if entry.reasons is None:
        entry.reasons = []
    entry.reasons.append(reason)
    if entry.attempts >= entry.max_attempts:
        why = "; ".join(entry.reasons[-3:])
        scheduler._resolve(
            entry,
            TaskStatus.LOST,
            f"its worker died on all {entry.attempts} attempts (max_attempts={entry.max_attempts}): {why}",
            slot_id=slot.slot_id,
        )
        return
    scheduler.stats.retries += 1
    requeue(scheduler, entry, slot, reason, elsewhere=True)


def requeue(scheduler: Scheduler, entry: TaskEntry, slot: SlotRecord, reason: str, *, elsewhere: bool = False) -> None:
    """Back to the injector (or to waiting, if an input it reads is gone too), announced.
    `elsewhere` (an attempt died under it there): to the least busy slot of another host that
    can run it, if there is one. From the injector, the slot restarted where it died took it
    again: a task that a host's memory limit kills was retried there until lost, while other
    hosts ran its like."""
    entry.steal_refused = False
    scheduler.stats.requeues += 1
    scheduler._out.append(
        AnnounceRequeue(task_id=entry.task_id, slot_id=slot.slot_id, attempts=entry.attempts, reason=reason)
    )
    scheduler._note(entry, f"requeued: {reason}")
    if entry.reads and deps.park_if_unready(scheduler, entry):
        if entry.place is Place.WAITING:  # behind its inputs' producers' next attempts, if it may
            feedahead.try_feed(scheduler, entry)
        return
    if elsewhere and entry.home is None and not entry.reads:  # (where its inputs are decides for those)
        other = _least_busy_elsewhere(scheduler, entry, slot.host_id)
        if other is not None:
            # queued there as at its inputs' host: the host where it died may take it only from a
            # deque deeper than `locality_slack` (deps.may_steal), as for locality
            entry.home, entry.home_slot = other.host_id, None
            scheduler._push_deque_front(other, entry)
            scheduler._fill(other)
            return
    klass = scheduler._class_of(entry.requires)
    injector.push(scheduler, entry, klass)
    scheduler._feed_hungry(klass)


def _least_busy_elsewhere(scheduler: Scheduler, entry: TaskEntry, host_id: str) -> SlotRecord | None:
    """The up slot, on a host other than `host_id` and not suspected, that can run `entry` and
    holds the least work; None when there is none. A scan: retries are rare. A suspected host
    is idle as far as anyone can tell, and would have been the least busy (`suspicion.py`)."""
    best: SlotRecord | None = None
    suspected = scheduler._suspected
    for candidate in scheduler._slots.values():
        if candidate.state is not SlotState.UP or candidate.host_id == host_id or candidate.host_id in suspected:
            continue
        if not entry.requires <= candidate.capabilities:
            continue
        if best is None or len(candidate.deque) + len(candidate.window) < len(best.deque) + len(best.window):
            best = candidate
    return best


def requeue_deque(scheduler: Scheduler, slot: SlotRecord) -> None:
    """Everything assigned to `slot` and not yet sent goes back to the injector."""
    while slot.deque:
        entry = slot.deque.popleft()
        scheduler._queued -= 1
        entry.slot = None
        if not (entry.reads and deps.park_if_unready(scheduler, entry)):
            injector.push(scheduler, entry, scheduler._class_of(entry.requires))


def after_capacity_change(scheduler: Scheduler) -> None:
    """After a loss: feed survivors, and fail work nothing can ever run again."""
    if scheduler._unfit:  # an unfit host that alone can run some work now takes it again
        hostfit.review(scheduler)
    for klass in scheduler._classes.values():
        if klass.live and not scheduler._can_ever_run(klass):
            fail_unschedulable(scheduler, klass)
    for slot in scheduler._hungry.snapshot():
        scheduler._fill(slot)


def fail_unschedulable(scheduler: Scheduler, klass: CapabilityClass) -> None:
    """No slot can ever run `klass` again: resolve its queued tasks as unschedulable."""
    heap, klass.heap = klass.heap, []
    for _neg, _seq, token, entry in heap:
        if entry.place is Place.INJECTOR and entry.token == token:
            klass.live -= 1
            scheduler._queued -= 1
            entry.place = Place.GONE
            scheduler._resolve(entry, TaskStatus.UNSCHEDULABLE, unschedulable_reason(scheduler, entry))


def unschedulable_reason(scheduler: Scheduler, entry: TaskEntry) -> str:
    """Why no slot can ever run `entry`, and the fix."""
    slots = scheduler._slots.values()
    offered = sorted({c for s in slots if s.state is not SlotState.RETIRED for c in s.capabilities})
    need = ", ".join(sorted(entry.requires)) or "nothing"
    have = ", ".join(offered) or "no slots at all"
    fix = "the task's backend" if entry.requires <= {CAP_CPU, CAP_GPU} else "the task's requires= (or its backend)"
    retired = any(entry.requires <= s.capabilities for s in slots if s.state is SlotState.RETIRED)
    if retired:  # the slots were there (an allocation ended, a host was drained): not a wrong backend
        return (
            f"no slot offers {need} any more: every host that had one was retired, or its slots could not "
            f"start (the log and the summary say why: an allocation that ended, a host drained, a limit "
            f"on the host); add hosts, or run it again"
        )
    return f"no slot offers {need} (the cluster offers: {have}); add such a host or change {fix}"
