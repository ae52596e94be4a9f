"""The work-stealing scheduler as a pure state machine: `handle(event, now) -> instructions`.

Everything that decides where a task runs lives here; the runtime only moves bytes and
clocks. Rules (Blumofe & Leiserson, adapted to a coordinator that sees every slot):

* Places. A live task is in exactly one place: the global *injector* (one priority heap per
  capability class), one slot's *deque* (assigned, not yet sent), or one slot's *window*
  (sent to the host agent; queued there or running). `validate()` checks this.
* Filling a window. A slot with room in its window takes, in order: the head of its own
  deque, unless the injector holds strictly higher priority work; a fair share of the
  injector (`live / eligible slots + 1`, capped) moved into its deque; the oldest eligible
  task of a victim's deque, the victim drawn with the seeded RNG.
* The tail. While fewer than `tail_tasks_per_slot` tasks per up slot of the same capabilities
  wait in the injector and deques, a slot that already holds a task gets no more: the last
  tasks go to whichever slot frees first, as from a shared queue, instead of waiting behind
  a running task (the agent feeds a short task to the slot process behind the running one,
  where no steal-back can reach it; the sends just before go as *tail* tasks, `tailfeed.py`).
  A lone slot of its kind always fills its window.
* Steal-back. A slot that found nothing at all asks the agent of a random victim to give
  back the newest half of the tasks in that victim's window not known to have started. Only
  the agent knows what has started, so the steal is transactional: tasks move only when the
  agent confirms (`StealBackAnswered`). Newest first, because the agent starts them oldest
  first: those are the ones most likely still unstarted.
* Windows are sized to hide the round trip: `1 + ceil(round_trip / mean run time)` tasks,
  clamped to [min_window, max_window], per slot, from an exponential moving average
  (`windows.py`).
* Attempts count starts. A task sent to a slot that is then lost is requeued; if it had
  started, the attempt stands, and after `max_attempts` such losses it resolves LOST with
  the reasons. One lost before it started is requeued free, `max_attempts` + 2 times (it
  may be what takes its host down: `recovery.py`). A kernel error or a timeout is final:
  retrying a deterministic failure only wastes the cluster. A host's own failure ("unfit": a
  value it cannot hold) is no attempt: the task goes elsewhere, the host gets no work (`hostfit.py`).
* Exactly once. Each task id gets one `ResolveTask`. A result that arrives for a task no
  longer in that slot's window (late, duplicate, or from an earlier attempt) is dropped and
  counted in `stats.dropped_results`. A cancelled or timed-out task stays in its window as a
  *zombie* (resolved, still occupying the agent) until the agent answers for it.
* Capability matching. A task's `requires` must be a subset of a slot's capabilities; a
  task that no joined slot (up or expected back) can ever run resolves UNSCHEDULABLE.
* Suspected hosts (silent past `suspect_after`, not lost yet) are sent only work that no
  host up and heard from can run; a retry goes to a host heard from (`suspicion.py`).

* Dependencies. A task naming unfinished upstream tasks or kept objects *waits* in no
  queue until they are there; it then goes to the host holding its bytes (`deps.py`), or,
  when they are being made in one slot, to that slot at once, behind them (`feedahead.py`).

Time arrives as `now`; randomness from a `random.Random(seed)` owned by the instance. The
records the scheduler keeps are in `placement.py`, the injector's heaps in `injector.py`, the
stealing in `stealing.py`, and the checks of `validate()` in `invariants.py`; their public names
are importable from here too.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

from batuta.core import deps, feedahead, hostfit, injector, invariants, recovery, suspicion, windows
from batuta.core.events import (
    AbortTasks,
    AnnounceDrained,
    CancelRequested,
    Event,
    HostDrainRequested,
    HostExpected,
    HostId,
    HostLost,
    HostSuspected,
    Instruction,
    KeptObjectsLost,
    ObjectLost,
    ObjectReleased,
    ResolveTask,
    RoundTripMeasured,
    SchedulingPaused,
    SchedulingResumed,
    SendTasks,
    ShutdownRequested,
    SlotId,
    SlotJoined,
    SlotLost,
    StealBackAnswered,
    TaskOutcomeReported,
    TaskStartReported,
    TaskSubmitted,
    TimerFired,
)
from batuta.core.placement import (
    CapabilityClass,
    HungrySlots,
    InvariantViolation,
    Place,
    SchedulerConfig,
    SchedulerError,
    SchedulerStats,
    SlotRecord,
    SlotSample,
    SlotState,
    SlotView,
    TaskEntry,
)
from batuta.core.stealing import (
    end_steal_back,
    on_steal_back_answered,
    recall_unstarted,
    steal_from_deque,
    steal_more_urgent,
    try_steal_back,
)
from batuta.core.tailfeed import in_tail, sent_as_tail
from batuta.core.task import Outcome, TaskStatus, slot_kind

# placement.py's public names, re-exported: callers import them from the scheduler
__all__ = [
    "InvariantViolation",
    "Place",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerError",
    "SchedulerStats",
    "SlotState",
    "SlotView",
]

_E = TypeVar("_E")
_OK, _ERROR, _UNFIT = Outcome.OK, Outcome.ERROR, Outcome.UNFIT  # globals: an enum's attributes are slower to reach


def _handler(kind: type[_E], handler: Callable[[_E], None]) -> tuple[type, Callable[[Any], None]]:
    """One entry of the dispatch table, `handler` checked to take events of type `kind`."""
    return kind, handler


class Scheduler:
    """Sans-I/O work-stealing scheduler. Feed events, carry out the returned instructions."""

    def __init__(self, config: SchedulerConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or SchedulerConfig()
        self.stats = SchedulerStats()
        self._rng = random.Random(seed)
        self._tasks: dict[int, TaskEntry] = {}
        self._slots: dict[SlotId, SlotRecord] = {}
        self._host_slots: dict[HostId, list[SlotRecord]] = {}  # so per-host events touch only that host
        # where thieves probe for victims in a large cluster (see stealing.py): slots whose
        # deque, or whose window, has held work since they were last found empty
        self._deque_holders = SlotSample()
        self._window_holders = SlotSample()
        self._classes: dict[frozenset[str], CapabilityClass] = {}
        self._hungry = HungrySlots()  # UP slots with room in their window
        self._round_trip: dict[HostId, float] = {}
        # hosts drained by request, until undone: kept through a relaunch (its slots rejoin
        # draining: a kill -9 silently undid a drain), and those whose drain was announced
        self._draining: set[HostId] = set()
        self._drain_announced: set[HostId] = set()
        self._suspected: set[HostId] = set()  # silent, not lost yet: sent only what no other can run
        self._unfit: dict[HostId, str] = {}  # hosts given no work, and why (hostfit.py)
        self._unfit_announced: set[HostId] = set()  # ... said since their last loss
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, task_id, attempt)
        # task id -> the slot that asked for it back (None once that thief was lost); an
        # entry stays here until the agent answers, whatever happens to the thief meanwhile
        self._steal_thief: dict[int, SlotRecord | None] = {}
        self._expected: dict[HostId, tuple[frozenset[str], ...]] = {}
        self._seq = 0
        self._capability_epoch = 0  # bumped when the set of slots that may run work changes
        self._queued = 0  # live tasks in injector + deques
        self._top_priority = 0  # at least the highest priority waiting in a deque (`steal_more_urgent`)
        self._up_by_kind: dict[frozenset[str], int] = {}  # UP slots by their kind (`tailfeed.in_tail`)
        self._tail_waiting: dict[SlotId, SlotRecord] = {}  # held back by the tail, oldest first
        self._paused = False
        self._out: list[Instruction] = []
        self._sends: dict[SlotId, list[TaskEntry]] = {}
        self._made_ahead: dict[SlotId, set[int]] = {}  # objects the sends' fed-ahead tasks read
        self._story: deque[tuple[float, int, str]] | None = (
            deque(maxlen=self.config.story_length) if self.config.story_length > 0 else None
        )
        self._now = 0.0
        self._handlers: dict[type, Callable[[Any], None]] = dict(
            [
                _handler(TaskSubmitted, self._on_submitted),
                _handler(TaskStartReported, self._on_start_reported),
                _handler(TaskOutcomeReported, self._on_outcome_reported),
                _handler(SlotJoined, self._on_slot_joined),
                _handler(HostExpected, self._on_host_expected),
                _handler(SlotLost, self._on_slot_lost),
                _handler(HostLost, self._on_host_lost),
                _handler(StealBackAnswered, partial(on_steal_back_answered, self)),
                _handler(CancelRequested, self._on_cancel),
                _handler(TimerFired, self._on_timer),
                _handler(SchedulingPaused, self._on_paused),
                _handler(SchedulingResumed, self._on_resumed),
                _handler(HostDrainRequested, self._on_drain),
                _handler(HostSuspected, partial(suspicion.on_suspected, self)),
                _handler(RoundTripMeasured, partial(windows.on_round_trip, self)),
                _handler(ShutdownRequested, self._on_shutdown),
                _handler(ObjectReleased, partial(deps.on_released, self)),
                _handler(ObjectLost, partial(deps.on_lost, self)),
                _handler(KeptObjectsLost, partial(deps.on_kept_lost, self)),
            ]
        )
        self._shut_down = False
        self._offered: frozenset[str] = frozenset()
        self._offered_epoch = -1
        self._deps = deps.DependencyTable()

    # -- public API -------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Instruction]:
        """Apply one event at time `now`; return what the driver must do, in order."""
        return self.handle_many((event,), now)

    def handle_many(self, events: Iterable[Event], now: float) -> list[Instruction]:
        """Apply several events at once; sends to one slot are merged into one instruction.
        After `ShutdownRequested` every event is ignored: a closed pool places nothing."""
        self._now = now
        handlers = self._handlers
        for event in events:
            if self._shut_down:
                if isinstance(event, TaskOutcomeReported):
                    self.stats.dropped_results += 1
                continue
            handlers[type(event)](event)
        return self._flush()

    def can_accept(self, count: int = 1) -> bool:
        """Whether `count` more submissions fit under `max_queued` (backpressure)."""
        return self._queued + count <= self.config.max_queued

    @property
    def queued(self) -> int:
        """Tasks waiting in the injector or a deque (not yet sent to any host)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        return sum(len(s.window) for s in self._slots.values())

    @property
    def unresolved(self) -> int:
        return sum(1 for e in self._tasks.values() if not e.resolved)

    @property
    def waiting(self) -> int:
        """Tasks waiting for upstream tasks or kept objects (see `deps.py`)."""
        return len(self._deps.waiting)

    @property
    def paused(self) -> bool:
        return self._paused

    def unfit_reason(self, host: HostId) -> str | None:
        """Why `host` gets no new work for a failure of its own (hostfit.py); None: it is fit."""
        return self._unfit.get(host)

    def drain_state(self, host: HostId) -> str | None:
        """ "draining" (`Pool.drain`: what it holds still finishes), "drained" (announced idle), None."""
        if host not in self._draining:
            return None
        return "drained" if host in self._drain_announced else "draining"

    def offers(self, capability: str) -> bool:
        """Whether a slot that is up now offers `capability` (derived from the live slots, so a
        lost GPU host stops counting; cached until the set of slots changes)."""
        if self._offered_epoch != self._capability_epoch:
            live = [s.capabilities for s in self._slots.values() if s.state is SlotState.UP]
            self._offered = frozenset().union(*live)
            self._offered_epoch = self._capability_epoch
        return capability in self._offered

    def next_wakeup(self) -> float | None:
        """When the driver should deliver `TimerFired` next (a timeout backstop), if ever."""
        while self._deadlines:
            deadline, task_id, attempt = self._deadlines[0]
            entry = self._tasks.get(task_id)
            if entry is not None and not entry.resolved and entry.attempts == attempt:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def slots(self) -> list[SlotView]:
        return [
            SlotView(
                slot_id=s.slot_id,
                host_id=s.host_id,
                capabilities=s.capabilities,
                state=s.state.value,
                deque_depth=len(s.deque),
                in_flight=len(s.window),
                window_limit=s.window_limit,
                steals_in=s.steals_in,
                steals_out=s.steals_out,
                completed=s.completed,
                mean_run_s=s.mean_run_s,
            )
            for s in self._slots.values()
        ]

    def where(self, task_id: int) -> tuple[str, SlotId | None] | None:
        """Where a task is now: ("injector"|"deque"|"window", slot id), or None if resolved."""
        entry = self._tasks.get(task_id)
        if entry is None or entry.resolved:
            return None
        return entry.place.name.lower(), entry.slot.slot_id if entry.slot else None

    def attempts(self, task_id: int) -> int:
        entry = self._tasks.get(task_id)
        return entry.attempts if entry is not None else 0

    def story(self, task_id: int | None = None) -> list[tuple[float, int, str]]:
        """Recent transitions (all, or one task's), when `story_length` > 0."""
        if self._story is None:
            return []
        return [s for s in self._story if task_id is None or s[1] == task_id]

    # -- events -----------------------------------------------------------------------------

    def _on_submitted(self, ev: TaskSubmitted) -> None:
        if ev.task_id in self._tasks:
            raise SchedulerError(f"task id {ev.task_id} submitted twice")
        if not self.can_accept():
            raise SchedulerError(f"scheduler is full ({self.config.max_queued} queued); wait for can_accept()")
        self.stats.submitted += 1
        self._seq += 1
        entry = TaskEntry(
            task_id=ev.task_id,
            priority=int(ev.priority),
            requires=ev.requires,
            timeout=ev.timeout,
            max_attempts=ev.max_attempts,
            seq=self._seq,
        )
        self._tasks[ev.task_id] = entry
        self._top_priority = max(self._top_priority, entry.priority)
        klass = self._class_of(entry.requires)
        if not self._can_ever_run(klass):
            self._resolve(entry, TaskStatus.UNSCHEDULABLE, recovery.unschedulable_reason(self, entry))
            return
        linked = ev.after or ev.reads or ev.keep_as or (ev.puts and deps.on_gpu(ev.requires))
        if linked and (deps.on_submitted(self, entry, ev) or ev.reads or entry.puts):
            if entry.place is Place.WAITING:
                feedahead.try_feed(self, entry)  # behind its inputs' producers, if they are in one window
            elif not entry.resolved:
                deps.place_ready(self, entry)  # where its inputs are
            return
        injector.push(self, entry, klass)
        self._note(entry, "queued")
        self._feed_hungry(klass)

    def _on_slot_joined(self, ev: SlotJoined) -> None:
        slot = self._slots.get(ev.slot_id)
        if slot is None:
            slot = SlotRecord(
                slot_id=ev.slot_id,
                host_id=ev.host_id,
                capabilities=frozenset(ev.capabilities),
                kind=slot_kind(frozenset(ev.capabilities)),
                state=SlotState.LOST,  # not up until `_set_state` below counts it
                window_limit=self.config.initial_window,
            )
            self._slots[ev.slot_id] = slot
            self._host_slots.setdefault(ev.host_id, []).append(slot)
        else:
            if slot.state is SlotState.UP:
                raise SchedulerError(f"slot {ev.slot_id} joined twice without being lost")
            slot.capabilities = frozenset(ev.capabilities)
            slot.kind = slot_kind(slot.capabilities)
            if slot.host_id != ev.host_id:
                self._host_slots[slot.host_id].remove(slot)
                self._host_slots.setdefault(ev.host_id, []).append(slot)
                slot.host_id = ev.host_id
        unfit = ev.host_id in self._unfit
        self._set_state(slot, SlotState.DRAINING if unfit or ev.host_id in self._draining else SlotState.UP)
        self._capability_epoch += 1
        if slot.state is SlotState.UP:
            self._hungry.add(slot)
            self._fill(slot)
        else:  # back from a relaunch, still drained or unfit: said again (its state was "up" meanwhile)
            self._check_drained(ev.host_id)
            if unfit:
                hostfit.rejoined(self, ev.host_id)

    def _on_host_expected(self, ev: HostExpected) -> None:
        self._expected[ev.host_id] = tuple(frozenset(c) for c in ev.slot_capabilities)
        self._capability_epoch += 1
        # The runtime says it again when the host is up, with what its slots do offer: work that
        # waited for what the configuration promised and the host lacks fails now, not never.
        recovery.after_capacity_change(self)

    def _on_host_lost(self, ev: HostLost) -> None:
        if self._deps.objects:  # first: its tasks requeued below must see their inputs gone
            deps.on_host_lost(self, ev.host_id, ev.reason)
        if ev.retired and self._expected.pop(ev.host_id, None) is not None:
            self._capability_epoch += 1
        self._suspected.discard(ev.host_id)  # relaunched, it is heard from when it joins
        recovery.lose_slots(self, list(self._host_slots.get(ev.host_id, ())), ev.reason, ev.retired)
        self._drain_announced.discard(ev.host_id)  # still drained: announced again when it is back
        self._unfit_announced.discard(ev.host_id)  # likewise still unfit
        recovery.after_capacity_change(self)

    def _on_slot_lost(self, ev: SlotLost) -> None:
        slot = self._slots.get(ev.slot_id)
        if slot is None:
            return
        recovery.lose_slot(self, slot, ev.reason, ev.retired, handed_back=ev.handed_back)
        recovery.after_capacity_change(self)

    def _on_start_reported(self, ev: TaskStartReported) -> None:
        entry = self._tasks.get(ev.task_id)
        if entry is None or entry.place is not Place.WINDOW or entry.slot is None:
            return
        if entry.slot.slot_id != ev.slot_id or entry.started:
            return
        entry.started = True
        self._note(entry, "started")
        if entry.timeout is not None and not entry.resolved:
            deadline = self._now + entry.timeout + self.config.timeout_grace
            heapq.heappush(self._deadlines, (deadline, entry.task_id, entry.attempts))

    def _on_outcome_reported(self, ev: TaskOutcomeReported) -> None:
        entry = self._tasks.get(ev.task_id)
        slot = entry.slot if entry is not None else None
        if (
            entry is None
            or slot is None
            or entry.place is not Place.WINDOW
            or slot.slot_id != ev.slot_id
            or entry.attempts != ev.attempt
        ):
            self.stats.dropped_results += 1
            return
        del slot.window[entry.task_id]
        entry.place = Place.GONE
        entry.slot = None
        if entry.steal_pending:  # it finished before the agent saw our steal-back request
            thief = end_steal_back(self, entry)
            if thief is not None and thief is not slot:
                self._refill(thief)
        if entry.resolved:  # the agent confirmed a cancel or a backstop timeout
            del self._tasks[entry.task_id]
            self._refill(slot)
            return
        status = ev.outcome.final_status()
        if entry.unmet or entry.void:  # fed ahead, and its inputs never got there: not its result
            feedahead.retract(self, entry, slot)
        elif status is None and ev.outcome is _UNFIT:  # the host's failure, not the task's
            self._note(entry, f"refused by {slot.host_id}")
            hostfit.refused(self, entry, slot, ev.reason or f"host {slot.host_id} cannot run it")
        elif status is None:  # the worker crashed under it: the attempt is lost, not the task
            self._note(entry, f"crashed on {slot.slot_id}")
            if entry.keep_as:
                feedahead.void_behind(self, slot, entry)
            recovery.retry_or_lose(self, entry, slot, ev.reason or "worker process died")
        else:
            slot.completed += 1
            if ev.outcome is _OK or ev.outcome is _ERROR:
                windows.observe_run_time(self, slot, ev.run_s)
            if entry.keep_as:
                deps.on_kept(self, entry, ev.kept_bytes)
            self._resolve(entry, status, ev.reason, slot_id=slot.slot_id, payload=ev.payload)
        self._refill(slot)

    def _on_cancel(self, ev: CancelRequested) -> None:
        entry = self._tasks.get(ev.task_id)
        if entry is None or entry.resolved:
            return
        if entry.place is Place.INJECTOR:
            self._class_of(entry.requires).live -= 1
            self._queued -= 1
            entry.place = Place.GONE  # its heap item goes stale
        elif entry.place is Place.DEQUE:
            assert entry.slot is not None
            entry.slot.deque.remove(entry)
            self._queued -= 1
            entry.place = Place.GONE
            entry.slot = None
        elif entry.place is Place.WINDOW:
            assert entry.slot is not None
            self._out.append(AbortTasks(slot_id=entry.slot.slot_id, task_ids=(entry.task_id,)))
        self._resolve(entry, TaskStatus.CANCELLED, "cancelled", keep=entry.place is Place.WINDOW)

    def _on_timer(self, _ev: TimerFired) -> None:
        while self._deadlines and self._deadlines[0][0] <= self._now:
            _, task_id, attempt = heapq.heappop(self._deadlines)
            entry = self._tasks.get(task_id)
            if entry is None or entry.resolved or entry.attempts != attempt:
                continue
            if entry.place is not Place.WINDOW or entry.slot is None:
                continue
            slot = entry.slot
            self._out.append(AbortTasks(slot_id=slot.slot_id, task_ids=(task_id,)))
            reason = (
                f"no result {entry.timeout:g}s timeout + {self.config.timeout_grace:g}s grace "
                f"after it started on {slot.slot_id}; the agent did not enforce it"
            )
            self._resolve(entry, TaskStatus.TIMED_OUT, reason, slot_id=slot.slot_id, keep=True)

    def _on_paused(self, ev: SchedulingPaused) -> None:
        self._paused = True
        if ev.recall:  # a window may hold dozens of short tasks: they would start for long after
            for slot in self._slots.values():
                if slot.state is SlotState.UP and slot.window:
                    recall_unstarted(self, slot)

    def _on_resumed(self, _ev: SchedulingResumed) -> None:
        self._paused = False
        for slot in self._hungry.snapshot():
            self._fill(slot)

    def _on_drain(self, ev: HostDrainRequested) -> None:
        self._drain_announced.discard(ev.host_id)
        if ev.undo:
            self._draining.discard(ev.host_id)
            hostfit.forget(self, ev.host_id)  # undrained: a host unfit for work gets another try
            self.release_host(ev.host_id)
            return
        self._draining.add(ev.host_id)
        self.hold_host(ev.host_id)
        self._check_drained(ev.host_id)
        hostfit.review(self)  # an unfit host it made replaceable takes the work again
        for slot in self._hungry.snapshot():
            self._fill(slot)

    def hold_host(self, host_id: HostId) -> None:
        """The host's up slots take no new work (drained, or unfit: `hostfit.py`); what waits
        in their deques goes back to the queue, what runs there finishes."""
        for slot in self._host_slots.get(host_id, ()):
            if slot.state is SlotState.UP:
                self._set_state(slot, SlotState.DRAINING)
                self._hungry.discard(slot)
                self._tail_waiting.pop(slot.slot_id, None)
                recovery.requeue_deque(self, slot)

    def release_host(self, host_id: HostId, *, fill: bool = True) -> None:
        """`hold_host` undone: its held slots are up and hungry again, each filled at once with
        `fill` (else only a queue already waiting ever reached it)."""
        for slot in self._host_slots.get(host_id, ()):
            if slot.state is SlotState.DRAINING:
                self._set_state(slot, SlotState.UP)
                self._hungry.add(slot)
                if fill:
                    self._fill(slot)

    def _on_shutdown(self, ev: ShutdownRequested) -> None:
        """Resolve everything as cancelled, in submission order, and forget every placement:
        the hosts are being shut down, so nothing is aborted or stolen back."""
        for entry in sorted((e for e in self._tasks.values() if not e.resolved), key=lambda e: e.task_id):
            if not entry.resolved:  # its upstream's cancellation may have resolved it meanwhile
                self._resolve(entry, TaskStatus.CANCELLED, ev.reason)
        self._tasks = {}
        self._deps = deps.DependencyTable()
        for slot in self._slots.values():
            slot.deque.clear()
            slot.window.clear()
            slot.steal_backs_pending = 0
        for klass in self._classes.values():
            klass.heap.clear()
            klass.live = 0
        self._queued = 0
        self._hungry.clear()
        self._tail_waiting.clear()
        self._deque_holders.clear()
        self._window_holders.clear()
        self._sends.clear()
        self._made_ahead.clear()
        self._deadlines.clear()
        self._steal_thief.clear()
        self._shut_down = True

    # -- placement --------------------------------------------------------------------------

    def _feed_hungry(self, klass: CapabilityClass) -> None:
        """Offer new work in `klass` to slots with room, round robin."""
        if self._tail_waiting and not self._paused:
            self._end_tail_waits()
        if self._paused or not self._hungry:
            return
        for group in self._hungry.groups_for(klass.requires):
            for _ in range(len(group)):  # each slot looked at once, from the front
                if klass.live == 0:
                    return
                if not group:
                    break
                slot_id, slot = next(iter(group.items()))
                self._fill(slot)
                # rotate, so that a trickle of submissions spreads over the slots
                if slot_id in group:
                    group.move_to_end(slot_id)

    def _refill(self, slot: SlotRecord) -> None:
        if slot.state is SlotState.UP:
            if len(slot.window) < slot.window_limit:
                self._hungry.add(slot)
            self._fill(slot)
        elif slot.state is SlotState.DRAINING:
            self._check_drained(slot.host_id)

    def _fill(self, slot: SlotRecord) -> None:
        """Top up the slot's window from its deque, the injector, and by stealing."""
        if self._paused or slot.state is not SlotState.UP:
            return
        self._tail_waiting.pop(slot.slot_id, None)
        window = slot.window
        while len(window) < slot.window_limit:
            entry = self._next_for(slot, ahead=(ahead := bool(window)))
            if entry is None:
                break
            entry.place = Place.WINDOW
            entry.slot = slot
            entry.attempts += 1
            entry.started = entry.void = False
            entry.tail = ahead and sent_as_tail(self, slot)
            window[entry.task_id] = entry
            self._sends.setdefault(slot.slot_id, []).append(entry)
            if entry.keep_as and self._deps.waiting:
                feedahead.follow(self, slot, entry)  # its waiting readers, right behind it
        if self._deps.waiting and window and len(window) < slot.window_limit:
            feedahead.follow_window(self, slot)  # readers of what it makes that found no room before
        if window:
            self._window_holders.add(slot)
        if len(window) >= slot.window_limit:
            self._hungry.discard(slot)
        elif window and in_tail(self, slot):
            # full enough for now: hungry again at its next result, or once enough work waits
            # (`_feed_hungry`), rather than offered every submission only to refuse it
            self._hungry.discard(slot)
            self._tail_waiting[slot.slot_id] = slot
        elif not window and slot.steal_backs_pending == 0 and slot.host_id not in self._suspected:
            try_steal_back(self, slot)

    def _next_for(self, slot: SlotRecord, *, ahead: bool) -> TaskEntry | None:
        """Own deque first (unless the injector has higher priority), then injector, then steal.

        `ahead`: the slot already holds a task, so this one would wait behind it. Near the end
        of the work (`tailfeed.in_tail`) nothing is sent ahead: the last tasks wait here for whichever
        slot frees first, as a shared queue hands them out, instead of behind a running task.
        """
        if ahead and in_tail(self, slot):
            return None
        if self._suspected and slot.host_id in self._suspected:
            return suspicion.next_for(self, slot)
        own = slot.deque
        best_class = injector.best_class(self, slot)
        if own and (best_class is None or injector.head_priority(best_class) <= own[0].priority):
            if own[0].priority < self._top_priority:  # another deque may hold more urgent work
                urgent = steal_more_urgent(self, slot, own[0].priority)
                if urgent is not None:
                    return urgent
            self._queued -= 1
            return own.popleft()
        if best_class is not None:
            if own:  # the injector holds strictly more urgent work: take just that task
                return injector.pop(self, best_class)
            injector.grab(self, slot, best_class)
            if own:
                self._queued -= 1
                return own.popleft()
        return steal_from_deque(self, slot)

    def _end_tail_waits(self) -> None:
        """Enough work waits again: the slots the tail held back fill their windows, in the
        order they were held back, until the work left is a tail again (so a trickle at the
        threshold wakes one slot per task, never all of them)."""
        waiting = self._tail_waiting
        while waiting:
            slot = next(iter(waiting.values()))
            if slot.state is SlotState.UP and in_tail(self, slot):
                return
            del waiting[slot.slot_id]
            if slot.state is SlotState.UP:
                self._hungry.add(slot)
                self._fill(slot)

    # -- resolution -----------------------------------------------------------------------

    def _resolve(
        self,
        entry: TaskEntry,
        status: TaskStatus,
        reason: str,
        *,
        slot_id: SlotId | None = None,
        keep: bool = False,
        payload: object = None,
    ) -> None:
        """Decide the task's final status. `keep`: it stays in its window until the agent answers."""
        if entry.resolved:
            raise SchedulerError(f"task {entry.task_id} resolved twice")
        entry.resolved = True
        self.stats.resolved += 1
        self._note(entry, f"resolved {status.value}")
        if not keep:
            entry.place = Place.GONE
            self._tasks.pop(entry.task_id, None)
            if not self._tasks:
                self._tasks = {}  # let a drained burst's table go (dicts never shrink)
        self._out.append(
            ResolveTask(
                task_id=entry.task_id,
                status=status,
                slot_id=slot_id,
                attempts=entry.attempts,
                reason=reason,
                payload=payload,
            )
        )
        if self._deps.active or entry.puts:  # after its own ResolveTask: its dependents follow
            deps.on_resolved(self, entry, status, reason, self._slots.get(slot_id) if slot_id is not None else None)

    # -- helpers ----------------------------------------------------------------------------

    def _class_of(self, requires: frozenset[str]) -> CapabilityClass:
        klass = self._classes.get(requires)
        if klass is None:
            # the one scan of the slots for this class; `_set_state` keeps the count after
            eligible = sum(1 for s in self._slots.values() if s.state is SlotState.UP and requires <= s.capabilities)
            klass = self._classes[requires] = CapabilityClass(requires=requires, eligible=eligible)
        return klass

    def _set_state(self, slot: SlotRecord, state: SlotState) -> None:
        """Move `slot` to `state`, keeping each class's count of UP slots that can run it."""
        was_up = slot.state is SlotState.UP
        slot.state = state
        if was_up != (state is SlotState.UP):
            delta = -1 if was_up else 1
            self._up_by_kind[slot.kind] = self._up_by_kind.get(slot.kind, 0) + delta
            for klass in self._classes.values():
                if klass.requires <= slot.capabilities:
                    klass.eligible += delta

    def _can_ever_run(self, klass: CapabilityClass) -> bool:
        if klass.runnable_epoch != self._capability_epoch:
            klass.runnable = any(
                klass.requires <= s.capabilities for s in self._slots.values() if s.state is not SlotState.RETIRED
            ) or any(klass.requires <= caps for host in self._expected.values() for caps in host)
            klass.runnable_epoch = self._capability_epoch
        return klass.runnable

    def _push_deque_front(self, slot: SlotRecord, entry: TaskEntry) -> None:
        entry.place = Place.DEQUE
        entry.slot = slot
        slot.deque.appendleft(entry)
        self._deque_holders.add(slot)
        self._top_priority = max(self._top_priority, entry.priority)
        self._queued += 1

    def _check_drained(self, host_id: HostId) -> None:
        if host_id not in self._draining or host_id in self._drain_announced:
            return
        for slot in self._host_slots.get(host_id, ()):
            if slot.window or slot.deque:
                return
        self._drain_announced.add(host_id)
        self._out.append(AnnounceDrained(host_id=host_id))

    def _note(self, entry: TaskEntry, what: str) -> None:
        if self._story is not None:
            self._story.append((self._now, entry.task_id, what))

    def _flush(self) -> list[Instruction]:
        if self._sends:
            sends: list[Instruction] = [
                SendTasks(
                    slot_id=slot_id,
                    task_ids=tuple(e.task_id for e in entries),
                    attempts=tuple(e.attempts for e in entries),
                    made_ahead=tuple(sorted(self._made_ahead.get(slot_id, ()))),
                    tail=tuple(e.task_id for e in entries if e.tail),
                )
                for slot_id, entries in self._sends.items()
            ]
            self._sends = {}
            self._made_ahead.clear()
            # sends go first: a ResolveTask in the same batch never concerns a task just sent
            out, self._out = sends + self._out, []
            return out
        out, self._out = self._out, []
        return out

    # -- invariants -------------------------------------------------------------------------

    def validate(self) -> None:
        """Check that every task is in exactly one place and the counters agree (see invariants.py)."""
        invariants.validate(self)
