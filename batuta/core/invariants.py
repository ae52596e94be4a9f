"""The scheduler's invariant checker: every live task in exactly one place, every counter right.

`Scheduler.validate()` calls `validate(scheduler)`. It lives apart from the scheduler because
it is no part of scheduling: it only reads the scheduler's state (its private tables, as a
friend of the class) and raises `InvariantViolation` with the task's story when that state
contradicts the rules in `batuta.core.scheduler`'s docstring. Tests and fuzzers call it after
every event; the runtime never does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from batuta.core.deps import ObjectState
from batuta.core.placement import InvariantViolation, Place, SlotRecord, SlotState, TaskEntry

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def validate(scheduler: Scheduler) -> None:
    """Check that every task is in exactly one place and the counters agree."""
    tasks = scheduler._tasks
    seen: dict[int, str] = {}

    def place(entry: TaskEntry, where: str) -> None:
        if entry.task_id in seen:
            _violation(scheduler, entry, f"in {seen[entry.task_id]} and in {where}")
        seen[entry.task_id] = where
        if tasks.get(entry.task_id) is not entry:
            _violation(scheduler, entry, f"in {where} but not tracked")

    injector_live = 0
    for klass in scheduler._classes.values():
        live = 0
        for _neg, _seq, token, entry in klass.heap:
            if entry.place is Place.INJECTOR and entry.token == token:
                place(entry, "injector")
                live += 1
                if entry.resolved:
                    _violation(scheduler, entry, "resolved but queued in the injector")
        if live != klass.live:
            raise InvariantViolation(f"class {sorted(klass.requires)} counts {klass.live} live, has {live}")
        eligible = sum(
            1 for s in scheduler._slots.values() if s.state is SlotState.UP and klass.requires <= s.capabilities
        )
        if eligible != klass.eligible:
            raise InvariantViolation(
                f"class {sorted(klass.requires)} counts {klass.eligible} eligible slots, has {eligible}"
            )
        injector_live += live
    deque_total = 0
    for slot in scheduler._slots.values():
        for entry in slot.deque:
            place(entry, f"deque of {slot.slot_id}")
            deque_total += 1
            if entry.place is not Place.DEQUE or entry.slot is not slot:
                _violation(scheduler, entry, f"in deque of {slot.slot_id} but marked {entry.place.name}")
            if entry.resolved:
                _violation(scheduler, entry, "resolved but queued in a deque")
        for task_id, entry in slot.window.items():
            place(entry, f"window of {slot.slot_id}")
            if task_id != entry.task_id or entry.place is not Place.WINDOW or entry.slot is not slot:
                _violation(scheduler, entry, f"in window of {slot.slot_id} but marked {entry.place.name}")
            if not entry.requires <= slot.capabilities:
                _violation(scheduler, entry, f"needs {sorted(entry.requires)} but sits on {slot.slot_id}")
        if slot.state in (SlotState.LOST, SlotState.RETIRED) and (slot.window or slot.deque):
            raise InvariantViolation(f"lost slot {slot.slot_id} still holds tasks")
        _check_fed_ahead(scheduler, slot)
    for host_id, slots in scheduler._host_slots.items():
        for slot in slots:
            if slot.host_id != host_id or scheduler._slots.get(slot.slot_id) is not slot:
                raise InvariantViolation(f"slot {slot.slot_id} listed under host {host_id} but is on {slot.host_id}")
    if sum(len(slots) for slots in scheduler._host_slots.values()) != len(scheduler._slots):
        raise InvariantViolation("the per-host lists of slots do not hold every slot exactly once")
    for slot in scheduler._slots.values():
        if slot.deque and slot not in scheduler._deque_holders:
            raise InvariantViolation(f"slot {slot.slot_id} holds a deque but thieves cannot find it")
    for task_id, entry in scheduler._deps.waiting.items():
        place(entry, "waiting")
        if task_id != entry.task_id or entry.place is not Place.WAITING or entry.unmet <= 0 or entry.resolved:
            _violation(scheduler, entry, f"waiting but marked {entry.place.name}, {entry.unmet} unmet")
    up_by_kind: dict[frozenset[str], int] = {}
    for slot in scheduler._slots.values():
        if slot.state is SlotState.UP:
            up_by_kind[slot.kind] = up_by_kind.get(slot.kind, 0) + 1
    if up_by_kind != {kind: n for kind, n in scheduler._up_by_kind.items() if n}:
        raise InvariantViolation(f"up slots by kind {scheduler._up_by_kind} != counted {up_by_kind}")
    if injector_live + deque_total != scheduler._queued:
        raise InvariantViolation(f"queued counter {scheduler._queued} != {injector_live} + {deque_total}")
    for task_id, entry in tasks.items():
        if task_id not in seen:
            _violation(scheduler, entry, f"tracked as {entry.place.name} but in no place")
    steal_thief = scheduler._steal_thief
    pending = sum(s.steal_backs_pending for s in scheduler._slots.values())
    tracked = sum(1 for thief in steal_thief.values() if thief is not None)
    if pending != tracked:
        raise InvariantViolation(f"{pending} steal-backs pending by count, {tracked} tracked")
    for task_id in steal_thief:
        stolen = tasks.get(task_id)
        if stolen is None or not stolen.steal_pending or stolen.place is not Place.WINDOW:
            raise InvariantViolation(f"steal-back of task {task_id} tracked but the task is not in a window")


def _check_fed_ahead(scheduler: Scheduler, slot: SlotRecord) -> None:
    """A task in `slot`'s window whose inputs are still to come was fed ahead (feedahead.py):
    unless its attempt is void, each such input's producer is ahead of it in the same window,
    and it counts exactly those inputs."""
    order = {task_id: i for i, task_id in enumerate(slot.window)}
    objects = scheduler._deps.objects
    for entry in slot.window.values():
        if not entry.unmet or entry.resolved:
            continue
        pending = [
            objects[o]
            for o in entry.reads
            if o in objects and objects[o].state is ObjectState.PENDING and entry in objects[o].readers
        ]
        if len(pending) != entry.unmet:
            _violation(scheduler, entry, f"in a window counting {entry.unmet} unmet inputs, {len(pending)} pending")
        if entry.void:
            continue
        for record in pending:
            producer = scheduler._tasks.get(record.producer)
            if (
                producer is None
                or producer.slot is not slot
                or order.get(producer.task_id, len(order)) > order[entry.task_id]
            ):
                what = f"object {record.object_id}'s producer is not ahead of it"
                _violation(scheduler, entry, f"fed ahead on {slot.slot_id}, but {what}")


def _violation(scheduler: Scheduler, entry: TaskEntry, what: str) -> NoReturn:
    story = "; ".join(f"{t:.6f} {w}" for t, _i, w in scheduler.story(entry.task_id)) or "no story kept"
    raise InvariantViolation(f"task {entry.task_id} {what} (story: {story})")
