"""The scheduler's records: where each live task is placed, and the values it shares with callers.

`batuta.core.scheduler` decides; this module holds what it decides about, so that the
scheduler, its work stealing (`batuta.core.stealing`) and its invariant checker
(`batuta.core.invariants`) share one set of types without importing each other's code:

* `TaskEntry`, one per live task, with its `Place` (injector, a slot's deque, a slot's
  window, or gone) and the slot that holds it;
* `SlotRecord`, one per slot that ever joined: its deque, its window, its `SlotState`;
* `CapabilityClass`, the injector heap shared by tasks that need the same capabilities;
* `SlotSample`, a set of slots drawn from at random in O(1), where thieves look for victims;
* `HungrySlots`, the UP slots with room in their window, grouped by capabilities;
* what callers see: `SchedulerConfig`, `SchedulerStats`, the `SlotView` snapshot, and the
  errors `SchedulerError` and `InvariantViolation`.

The records are plain slotted dataclasses and the scheduler reads and writes their fields
directly: they are on every hot path, so they carry no methods or properties of their own.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from batuta.core.events import HostId, SlotId
from batuta.errors import BatutaError


class SchedulerError(BatutaError):
    """The driver misused the scheduler (a bug in the caller, not in a peer)."""


class InvariantViolation(SchedulerError):
    """`validate()` found the state inconsistent; the message tells the story."""


class Place(enum.IntEnum):
    INJECTOR = 0
    DEQUE = 1
    WINDOW = 2
    GONE = 3  # resolved and no longer occupying anything
    WAITING = 4  # for upstream tasks or kept objects (see deps.py); in no queue


class SlotState(enum.Enum):
    """Whether the scheduler may send a slot work (its value is `SlotView.state`)."""

    UP = "up"
    DRAINING = "draining"
    LOST = "lost"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    # Three, not two: the slot has its next task in hand and one more on its way, so a short
    # task no longer leaves it idle while the coordinator's next Run crosses the relay. On 16
    # busy cores that turned issue 17's growing-cost workload from above a shared queue to below
    # it (`scripts/window_ab.py`, medians: 1.153-1.163 with 2, 1.120 with 3, the shared queue
    # 1.132-1.136); on 2 cores it took 0.012 off lognormal tasks (bench/RESULTS.md, session 18).
    min_window: int = 3
    max_window: int = 64
    initial_window: int = 4
    default_round_trip: float = 0.001  # seconds, until the runtime measures it
    grab_max: int = 256  # most tasks a slot moves from the injector into its deque at once
    max_queued: int = 1_000_000  # tasks in injector + deques before submission must wait
    timeout_grace: float = 5.0  # backstop beyond an agent's own timeout enforcement
    story_length: int = 0  # >0 keeps a ring of recent transitions for error messages
    run_time_smoothing: float = 0.2  # weight of the newest run time in the moving average
    # victims a thief looks at: every slot in a cluster of at most this many, else this many
    # drawn at random among those that may hold work (see batuta.core.stealing)
    steal_probes: int = 16
    locality_min_bytes: int = 1 << 20  # kept input bytes on one host that make it the task's home
    locality_slack: int = 4  # a home deque longer than this may be stolen from by other hosts
    # the tail: while fewer tasks than this per up slot (of the same capabilities) wait in the
    # injector and deques, a slot already holding a task is sent no more; the last ones go to
    # whichever slot frees first, as from a shared queue, not behind a running task (0: off)
    tail_tasks_per_slot: int = 2
    # tail tasks: while fewer tasks than this per up slot wait, a task sent behind another is
    # marked `tail` and its agent feeds it to the slot process only once that is idle, so that
    # a steal-back can still take it (see batuta.core.tailfeed; 0: off)
    tail_unfed_tasks_per_slot: int = 4
    # feed-ahead: a dependent whose only missing inputs are kept results of tasks already sent
    # to one slot goes to that slot at once, behind them, instead of waiting for their results
    # to reach the coordinator (see batuta.core.feedahead)
    feed_ahead: bool = True


@dataclass(slots=True, eq=False)
class TaskEntry:
    """One live task: what it needs, and where it is now (exactly one place)."""

    task_id: int
    priority: int
    requires: frozenset[str]
    timeout: float | None
    max_attempts: int
    seq: int
    attempts: int = 0
    place: Place = Place.INJECTOR
    slot: SlotRecord | None = None
    token: int = 0  # invalidates stale injector heap items
    started: bool = False
    resolved: bool = False  # a zombie: resolved but the agent still holds it
    steal_pending: bool = False
    steal_refused: bool = False  # the agent refused it (it started), or it was stolen back once
    reasons: list[str] | None = None
    unstarted_losses: int = 0  # its slot was lost while it waited there, not yet started (recovery.py)
    keep_as: int = 0  # the object its result is kept as (deps.py)
    reads: tuple[int, ...] = ()  # kept objects it reads
    unmet: int = 0  # upstream tasks and objects it still waits for
    home: HostId | None = None  # the host holding its inputs, when queued there for locality
    home_slot: SlotId | None = None  # the GPU slot holding copies of its put values (deps.py)
    puts: tuple[int, ...] = ()  # put values a GPU task reads (deps.py)
    # fed ahead (feedahead.py), and a producer ahead of it there ended without making its input:
    # whatever this attempt reports is not its result
    void: bool = False
    tail: bool = False  # its current attempt was sent as a tail task (tailfeed.py)
    refused_on: HostId | None = None  # a host that refused it and was kept: not stolen there (hostfit.py)


@dataclass(slots=True, eq=False)
class SlotRecord:
    """One slot as the scheduler keeps it: its deque (assigned) and window (sent)."""

    slot_id: SlotId
    host_id: HostId
    capabilities: frozenset[str]
    kind: frozenset[str]  # its capabilities less its GPU's own (`task.slot_kind`): slots alike for the tail
    state: SlotState = SlotState.UP
    deque: deque[TaskEntry] = field(default_factory=deque)
    window: dict[int, TaskEntry] = field(default_factory=dict)  # insertion order = send order
    window_limit: int = 4
    mean_run_s: float | None = None
    steal_backs_pending: int = 0
    steals_in: int = 0
    steals_out: int = 0
    completed: int = 0


@dataclass(slots=True, eq=False)
class CapabilityClass:
    """Tasks that need the same capabilities share an injector heap."""

    requires: frozenset[str]
    heap: list[tuple[int, int, int, TaskEntry]] = field(default_factory=list)
    live: int = 0
    eligible: int = 0  # UP slots whose capabilities cover `requires` (kept by the scheduler, never scanned)
    runnable: bool = False  # cached: can some slot (present or expected) ever run it?
    runnable_epoch: int = -1


class SlotSample:
    """Slots that may hold something to steal, for O(1) random draws (rayon's victim probing).

    Members are added when they gain work; removal is lazy: a thief that draws a slot with
    nothing left removes it (`discard`), so no path that empties a deque or a window has to
    remember this index, and the cost of the cleanup is paid once per member by the draws.
    """

    __slots__ = ("_members", "_position")

    def __init__(self) -> None:
        self._members: list[SlotRecord] = []
        self._position: dict[SlotId, int] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, slot: SlotRecord) -> bool:
        return slot.slot_id in self._position

    def members(self) -> list[SlotRecord]:
        """A copy of the members, for a caller that must look at every one."""
        return list(self._members)

    def add(self, slot: SlotRecord) -> None:
        if slot.slot_id not in self._position:
            self._position[slot.slot_id] = len(self._members)
            self._members.append(slot)

    def discard(self, slot: SlotRecord) -> None:
        index = self._position.pop(slot.slot_id, None)
        if index is None:
            return
        last = self._members.pop()
        if last is not slot:  # move the last member into the hole
            self._members[index] = last
            self._position[last.slot_id] = index

    def draw(self, rng: random.Random) -> SlotRecord:
        """One member at random (the caller checks that there is one)."""
        members = self._members
        return members[rng.randrange(len(members))] if len(members) > 1 else members[0]

    def clear(self) -> None:
        self._members.clear()
        self._position.clear()


class HungrySlots:
    """UP slots with room in their window, grouped by their capabilities, each group in
    round-robin order, so that offering a task looks only at slots that could run it."""

    __slots__ = ("_count", "_groups")

    def __init__(self) -> None:
        self._groups: dict[frozenset[str], OrderedDict[SlotId, SlotRecord]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, slot: SlotRecord) -> None:
        """Make `slot` hungry; one that already is keeps its turn."""
        group = self._groups.get(slot.capabilities)
        if group is None:
            group = self._groups[slot.capabilities] = OrderedDict()
        if slot.slot_id not in group:
            group[slot.slot_id] = slot
            self._count += 1

    def discard(self, slot: SlotRecord) -> None:
        group = self._groups.get(slot.capabilities)
        if group is not None and group.pop(slot.slot_id, None) is not None:
            self._count -= 1

    def groups_for(self, requires: frozenset[str]) -> list[OrderedDict[SlotId, SlotRecord]]:
        """The groups whose slots can run tasks that need `requires` (there are few groups)."""
        return [group for caps, group in self._groups.items() if group and requires <= caps]

    def snapshot(self) -> list[SlotRecord]:
        return [slot for group in self._groups.values() for slot in group.values()]

    def clear(self) -> None:
        self._groups.clear()
        self._count = 0


@dataclass(slots=True)
class SchedulerStats:
    submitted: int = 0
    resolved: int = 0
    steals: int = 0  # deque-to-deque steals
    steal_backs_requested: int = 0
    steal_backs_returned: int = 0
    steal_backs_refused: int = 0
    retries: int = 0  # started attempts run again
    requeues: int = 0  # every return to the queue: those retries, and tasks lost before they started
    dropped_results: int = 0
    fed_ahead: int = 0  # dependents sent behind the tasks making their inputs (feedahead.py)
    fed_ahead_returned: int = 0  # of those, back from their slot unrun: a producer's attempt failed there


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotView:
    """A read-only snapshot of one slot, for observers (TUI, metrics)."""

    slot_id: SlotId
    host_id: HostId
    capabilities: frozenset[str]
    state: str
    deque_depth: int
    in_flight: int
    window_limit: int
    steals_in: int
    steals_out: int
    completed: int
    mean_run_s: float | None
