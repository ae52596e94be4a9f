"""Tasks that feed tasks: dependencies, kept objects, locality and lineage, for the scheduler.

A task may name, at submission, upstream tasks it must wait for (`TaskSubmitted.after`:
their values come back through the coordinator) and kept objects it reads
(`TaskSubmitted.reads`: results left on the host that made them, `keep_as`). Until every
one is there it is *waiting* (`Place.WAITING`): in no queue, sent nowhere, unless the
objects it still lacks are being made in one slot, which it is then sent to behind their
producers (`feedahead.py`; it stays among their readers there, and fails with them). The rules:

* Readiness. An upstream task is there when it succeeded; an object when its producer
  succeeded and the host holding it is up. A task can only name tasks and objects that
  already exist, so the graph has no cycles by construction.
* Failure. An upstream task or producer that ends in any other way resolves every waiting
  dependent at once: CANCELLED after a cancelled upstream, FAILED otherwise, with a reason
  naming the upstream task (and the object). Dependents of dependents follow, in order.
* Locality. A ready task that reads at least `locality_min_bytes` of kept objects goes to
  the deque of the least loaded slot of the host holding most of those bytes (its *home*),
  not to the injector. A slot of another host steals it only from a deque longer than
  `locality_slack` (the bytes would wait longer than they take to move), and never by
  steal-back. With no slot up there, it goes to the injector: the runtime moves the bytes.
* Put values on GPUs. A put value is at the coordinator and reaches each host once, so no
  task waits for one; but a GPU slot keeps a copy of what its tasks read on its card
  (`agent/device_values.py`), and a task on another GPU uploads it again over PCIe. So the
  slots whose GPU tasks read a put value are remembered (`ObjectRecord.copies`, a hint: an
  evicted copy or a restarted slot costs one upload), and a GPU task that reads at least
  `locality_min_bytes` of put values, with no kept inputs to follow, is queued at the least
  loaded slot holding the most of them (its `home_slot`); another slot, of that host too,
  takes it only from a deque longer than `locality_slack`. CPU tasks are placed as before:
  every slot of a host reads a put value from the agent's shared memory alike.
* Lineage. A host lost with kept objects on it, or a slot process that held some
  (`KeptObjectsLost`): each object's producer is run again
  (`RecomputeObject`: the runtime submits the recorded task again with the same
  `keep_as`), at most `max_attempts` times over the object's life, after which its readers
  fail. A requeued reader whose objects are missing waits again instead of running.

Like `stealing.py`, these are functions of the scheduler whose state they move; the
dependency tables live in `DependencyTable`, one per scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from batuta.core import injector
from batuta.core.events import (
    AbortTasks,
    AnnounceObjectLost,
    HostId,
    KeptObjectsLost,
    ObjectLost,
    ObjectReleased,
    RecomputeObject,
    SlotId,
    TaskSubmitted,
)
from batuta.core.placement import Place, SlotRecord, SlotState, TaskEntry
from batuta.core.task import CAP_GPU, TaskStatus

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


class ObjectState(enum.Enum):
    PENDING = "pending"  # its producer has not finished (or runs again)
    READY = "ready"  # on `host`
    FAILED = "failed"  # its producer failed, or it was lost more often than allowed


@dataclass(slots=True, eq=False)
class ObjectRecord:
    """One kept object: who makes it, where it is, and the waiting tasks that read it."""

    object_id: int
    producer: int
    max_attempts: int
    state: ObjectState = ObjectState.PENDING
    host: HostId | None = None
    slot_id: SlotId | None = None  # the slot that made it: its process keeps a copy too
    nbytes: int = 0
    runs: int = 1  # producer runs so far (the first, then one per loss)
    reason: str = ""
    readers: list[TaskEntry] = field(default_factory=list)
    copies: list[SlotId] = field(default_factory=list)  # a put value's: GPU slots that read it, newest last


MAX_COPIES = 16  # remembered per put value (the newest): more GPUs than a host has
PUT = 0  # a put value's producer: none, it was put


@dataclass(slots=True)
class DependencyTable:
    objects: dict[int, ObjectRecord] = field(default_factory=dict)
    kept_by: dict[int, int] = field(default_factory=dict)  # producer task id -> object id
    waiters: dict[int, list[TaskEntry]] = field(default_factory=dict)  # upstream task id -> dependents
    waiting: dict[int, TaskEntry] = field(default_factory=dict)
    failing: list[tuple[TaskEntry, TaskStatus, str]] = field(default_factory=list)
    cascading: bool = False

    @property
    def active(self) -> bool:
        return bool(self.kept_by or self.waiters or self.waiting)


def on_submitted(s: Scheduler, entry: TaskEntry, ev: TaskSubmitted) -> bool:
    """Register what `entry` makes and needs; True when it was parked or resolved here."""
    table = s._deps
    if ev.puts and on_gpu(ev.requires):  # only a GPU task's placement follows put values
        entry.puts = tuple(object_id for object_id, _ in ev.puts)
        for object_id, nbytes in ev.puts:
            if object_id not in table.objects:
                table.objects[object_id] = ObjectRecord(object_id, PUT, 1, ObjectState.READY, nbytes=nbytes)
    if ev.keep_as:
        entry.keep_as = ev.keep_as
        table.kept_by[entry.task_id] = ev.keep_as
        record = table.objects.get(ev.keep_as)
        if record is None:
            table.objects[ev.keep_as] = ObjectRecord(ev.keep_as, entry.task_id, max(1, ev.max_attempts))
        else:  # a run again after a loss (RecomputeObject): its readers keep waiting
            record.producer = entry.task_id
            record.state = ObjectState.PENDING
    entry.reads = ev.reads
    for upstream_id in ev.after:
        upstream = s._tasks.get(upstream_id)
        if upstream is not None and not upstream.resolved:
            table.waiters.setdefault(upstream_id, []).append(entry)
            entry.unmet += 1
    return _park_or_fail(s, entry)


def park_if_unready(s: Scheduler, entry: TaskEntry) -> bool:
    """Before requeueing `entry`: park it again if an object it reads went missing."""
    return bool(entry.reads) and _park_or_fail(s, entry)


def _park_or_fail(s: Scheduler, entry: TaskEntry) -> bool:
    table = s._deps
    for object_id in entry.reads:
        record = table.objects.get(object_id)
        if record is None or record.state is ObjectState.READY:
            continue  # a put value, or released: nothing to wait for here
        if record.state is ObjectState.FAILED:
            _fail(s, entry, TaskStatus.FAILED, record.reason)
            return True
        if entry not in record.readers:
            record.readers.append(entry)
            entry.unmet += 1
    if entry.unmet:
        entry.place = Place.WAITING
        entry.slot = None
        table.waiting[entry.task_id] = entry
        s._note(entry, f"waiting for {entry.unmet} input(s)")
        return True
    return False


def place_ready(s: Scheduler, entry: TaskEntry) -> None:
    """Queue a task whose inputs are all there: its home slot's deque, else the injector."""
    klass = s._class_of(entry.requires)
    if not s._can_ever_run(klass):
        from batuta.core.recovery import unschedulable_reason  # here: recovery imports this module

        s._resolve(entry, TaskStatus.UNSCHEDULABLE, unschedulable_reason(s, entry))
        return
    home = home_slot(s, entry) if entry.reads else None
    if home is None and entry.puts:
        home = copy_slot(s, entry)
        entry.home_slot = home.slot_id if home is not None else None
    if home is None:
        injector.push(s, entry, klass)
        s._feed_hungry(klass)
        return
    entry.place = Place.DEQUE
    entry.slot = home
    entry.home = home.host_id
    home.deque.append(entry)
    s._deque_holders.add(home)
    s._top_priority = max(s._top_priority, entry.priority)
    s._queued += 1
    s._note(entry, f"queued at {home.slot_id}, where its inputs are")
    s._refill(home)
    excess = len(home.deque) - s.config.locality_slack
    if excess > 0:  # a backlog there: as many idle slots elsewhere as it is long may take some
        for group in s._hungry.groups_for(entry.requires):
            for slot in list(islice(group.values(), excess + 1)):
                if slot is not home:
                    s._fill(slot)


def home_slot(s: Scheduler, entry: TaskEntry) -> SlotRecord | None:
    """The least loaded up slot that can run `entry` on the host with most of its bytes; the
    slot that made most of them if it is about as free (its process already holds them)."""
    by_host: dict[HostId, int] = {}
    by_slot: dict[SlotId, int] = {}
    for object_id in entry.reads:
        record = s._deps.objects.get(object_id)
        if record is not None and record.host is not None:
            by_host[record.host] = by_host.get(record.host, 0) + record.nbytes
            if record.slot_id is not None:
                by_slot[record.slot_id] = by_slot.get(record.slot_id, 0) + record.nbytes
    if not by_host:
        return None
    host, nbytes = max(by_host.items(), key=lambda item: item[1])
    if nbytes < s.config.locality_min_bytes:
        return None
    slots = [
        slot
        for slot in s._host_slots.get(host, ())
        if slot.state is SlotState.UP and entry.requires <= slot.capabilities
    ]
    if not slots:
        return None
    least = min(slots, key=lambda slot: len(slot.deque) + len(slot.window))
    maker = max(slots, key=lambda slot: by_slot.get(slot.slot_id, 0))
    if by_slot.get(maker.slot_id) and len(maker.deque) + len(maker.window) <= len(least.deque) + len(least.window) + 1:
        return maker
    return least


def on_gpu(requires: frozenset[str]) -> bool:
    """Whether a task with these requirements runs on a GPU (`gpu`, or one card's `gpu:N`)."""
    return any(cap == CAP_GPU or cap.startswith(f"{CAP_GPU}:") for cap in requires)


def copy_slot(s: Scheduler, entry: TaskEntry) -> SlotRecord | None:
    """The up slot that can run `entry` holding the most bytes of its put values on its card,
    the least loaded of those holding as many; None under `locality_min_bytes`."""
    by_slot: dict[SlotId, int] = {}
    for object_id in entry.puts:
        record = s._deps.objects.get(object_id)
        if record is not None:
            for slot_id in record.copies:
                by_slot[slot_id] = by_slot.get(slot_id, 0) + record.nbytes
    best: SlotRecord | None = None
    best_key = (0, 0)
    for slot_id, nbytes in by_slot.items():
        slot = s._slots.get(slot_id)
        if slot is None or slot.state is not SlotState.UP or not entry.requires <= slot.capabilities:
            continue
        key = (nbytes, -(len(slot.deque) + len(slot.window)))
        if nbytes >= s.config.locality_min_bytes and (best is None or key > best_key):
            best, best_key = slot, key
    return best


def may_steal(entry: TaskEntry, thief: SlotRecord, victim_depth: int, slack: int) -> bool:
    """Whether `thief` may take `entry` from a deque `victim_depth` long (locality rule), and
    not back to a host that refused it (`hostfit.py`)."""
    if entry.refused_on == thief.host_id:
        return False
    if victim_depth > slack or entry.home is None:
        return True
    return entry.home == thief.host_id and (entry.home_slot is None or entry.home_slot == thief.slot_id)


def on_kept(s: Scheduler, entry: TaskEntry, nbytes: int) -> None:
    """The producer's report said how many bytes its kept result holds."""
    record = s._deps.objects.get(entry.keep_as)
    if record is not None and record.producer == entry.task_id:
        record.nbytes = nbytes


def on_resolved(s: Scheduler, entry: TaskEntry, status: TaskStatus, reason: str, slot: SlotRecord | None) -> None:
    """`entry` resolved: wake or fail what waits for it and for the object it keeps."""
    table = s._deps
    table.waiting.pop(entry.task_id, None)
    object_id = table.kept_by.pop(entry.task_id, 0)
    record = table.objects.get(object_id) if object_id else None
    if entry.puts and status is TaskStatus.SUCCEEDED and slot is not None:
        _note_copies(s, entry, slot.slot_id)
    if record is not None and record.producer == entry.task_id:
        if status is TaskStatus.SUCCEEDED and slot is not None:
            record.state = ObjectState.READY
            record.host = slot.host_id
            record.slot_id = slot.slot_id
            readers, record.readers = record.readers, []
            for reader in readers:
                _satisfy(s, reader)
        else:
            why = f"input object {object_id}: its producer, task {entry.task_id}, {status.value}: {reason}"
            _fail_object(s, record, why, status)
    dependents = table.waiters.pop(entry.task_id, None)
    if dependents:
        if status is TaskStatus.SUCCEEDED:
            for dependent in dependents:
                _satisfy(s, dependent)
        else:
            failed = TaskStatus.CANCELLED if status is TaskStatus.CANCELLED else TaskStatus.FAILED
            for dependent in dependents:
                _fail(s, dependent, failed, f"upstream task {entry.task_id} {status.value}: {reason}")


def on_host_lost(s: Scheduler, host: HostId, reason: str) -> None:
    """Objects on `host` are gone: run their producers again, or fail their readers."""
    lost_slots = {slot.slot_id for slot in s._host_slots.get(host, ())}
    for record in list(s._deps.objects.values()):
        if record.state is ObjectState.READY and record.host == host:
            _remake(s, record, f"host {host}", reason)
        elif record.copies:  # a put value's copies on that host's cards went with it
            record.copies = [slot_id for slot_id in record.copies if slot_id not in lost_slots]


def _note_copies(s: Scheduler, entry: TaskEntry, slot_id: SlotId) -> None:
    """A GPU task that read put values succeeded on `slot_id`: its card now holds them."""
    for object_id in entry.puts:
        record = s._deps.objects.get(object_id)
        if record is None or record.producer != PUT:
            continue
        if slot_id in record.copies:
            record.copies.remove(slot_id)
        record.copies.append(slot_id)
        if len(record.copies) > MAX_COPIES:
            del record.copies[0]


def on_kept_lost(s: Scheduler, ev: KeptObjectsLost) -> None:
    """Objects that lived in a slot's process on a host that stays: as for a lost host."""
    for object_id in ev.object_ids:
        record = s._deps.objects.get(object_id)
        if record is not None and record.state is ObjectState.READY and record.host == ev.host_id:
            _remake(s, record, f"a slot process of host {ev.host_id}", ev.reason)


def _remake(s: Scheduler, record: ObjectRecord, where: str, reason: str) -> None:
    record.host = record.slot_id = None
    if record.runs >= record.max_attempts:
        why = (
            f"input object {record.object_id} was lost with {where} ({reason}) after its producer "
            f"ran {record.runs} time(s) (max_attempts={record.max_attempts})"
        )
        _fail_object(s, record, why, TaskStatus.LOST)
        s._out.append(AnnounceObjectLost(object_id=record.object_id, reason=why))
        return
    record.runs += 1
    record.state = ObjectState.PENDING
    s._out.append(
        RecomputeObject(object_id=record.object_id, task_id=record.producer, reason=f"lost with {where}: {reason}")
    )


def on_released(s: Scheduler, ev: ObjectReleased) -> None:
    """The runtime forgot the object: nothing reads it any more, so it is never remade."""
    record = s._deps.objects.pop(ev.object_id, None)
    if record is not None and s._deps.kept_by.get(record.producer) == ev.object_id:
        del s._deps.kept_by[record.producer]


def on_lost(s: Scheduler, ev: ObjectLost) -> None:
    """The runtime cannot make the object again: its readers fail, naming it."""
    record = s._deps.objects.get(ev.object_id)
    if record is not None and record.state is not ObjectState.FAILED:
        s._deps.kept_by.pop(record.producer, None)
        _fail_object(s, record, f"input object {ev.object_id} is lost: {ev.reason}", TaskStatus.LOST)


def _satisfy(s: Scheduler, entry: TaskEntry) -> None:
    if entry.resolved:
        return
    if entry.place is Place.WINDOW and entry.unmet:  # fed ahead of it (feedahead.py): nothing to place
        entry.unmet -= 1
        return
    if entry.place is not Place.WAITING:
        return
    entry.unmet -= 1
    if entry.unmet == 0:
        del s._deps.waiting[entry.task_id]
        # an object it found ready at submission may have been lost since: look again
        if not (entry.reads and _park_or_fail(s, entry)):
            place_ready(s, entry)


def _fail_object(s: Scheduler, record: ObjectRecord, why: str, status: TaskStatus) -> None:
    record.state = ObjectState.FAILED
    record.reason = why
    readers, record.readers = record.readers, []
    failed = TaskStatus.CANCELLED if status is TaskStatus.CANCELLED else TaskStatus.FAILED
    for reader in readers:
        _fail(s, reader, failed, why)


def _fail(s: Scheduler, entry: TaskEntry, status: TaskStatus, reason: str) -> None:
    """Resolve a dependent; dependents of dependents follow in order, without recursion."""
    table = s._deps
    table.failing.append((entry, status, reason))
    if table.cascading:
        return
    table.cascading = True
    try:
        while table.failing:
            doomed, doomed_status, why = table.failing.pop(0)
            if doomed.resolved:
                continue
            if doomed.place is Place.WINDOW and doomed.slot is not None:  # fed ahead (feedahead.py)
                _fail_fed_ahead(s, doomed, doomed_status, why)
                continue
            if doomed.place is Place.WAITING:
                doomed.place = Place.GONE
            s._resolve(doomed, doomed_status, why)
    finally:
        table.cascading = False


def _fail_fed_ahead(s: Scheduler, entry: TaskEntry, status: TaskStatus, reason: str) -> None:
    """Resolve a task fed ahead of an input that will never be made (feedahead.py): a zombie
    in its window until its agent answers, which it does by itself when the value was never
    made there. Aborted there only if a producer was resolved here while still at the agent
    (cancelled, or a backstop timeout): that one may yet make the value."""
    slot = entry.slot
    assert slot is not None
    abort = False
    for object_id in entry.reads:
        record = s._deps.objects.get(object_id)
        producer = s._tasks.get(record.producer) if record is not None else None
        if producer is not None and producer.resolved and producer.place is Place.WINDOW and not producer.void:
            abort = True
    entry.void = True  # it makes nothing there either: the agent answers its own dependents there
    if abort and slot.state is SlotState.UP:
        s._out.append(AbortTasks(slot_id=slot.slot_id, task_ids=(entry.task_id,)))
    s._resolve(entry, status, reason, keep=True)


def reset(s: Scheduler) -> None:
    s._deps = DependencyTable()
