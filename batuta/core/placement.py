"""The scheduler's records: where each live task is placed, and the values it shares with callers.

`batuta.core.scheduler` decides; this module holds what it decides about, so that the
scheduler, its work stealing (`batuta.core.stealing`) and its invariant checker
(`batuta.core.invariants`) share one set of types without importing each other's code:

* `TaskEntry`, one per live task, with its `Place` (injector, a slot's deque, a slot's
  window, or gone) and the slot that holds it;
* `SlotRecord`, one per slot that ever joined: its deque, its window, its `SlotState`;
* `CapabilityClass`, the injector heap shared by tasks that need the same capabilities;
* what callers see: `SchedulerConfig`, `SchedulerStats`, the `SlotView` snapshot, and the
  errors `SchedulerError` and `InvariantViolation`.

The records are plain slotted dataclasses and the scheduler reads and writes their fields
directly: they are on every hot path, so they carry no methods or properties of their own.
"""

from __future__ import annotations

import enum
from collections import deque
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
    min_window: int = 2
    max_window: int = 64
    initial_window: int = 4
    default_round_trip: float = 0.001  # seconds, until the runtime measures it
    grab_max: int = 256  # most tasks a slot moves from the injector into its deque at once
    max_queued: int = 1_000_000  # tasks in injector + deques before submission must wait
    timeout_grace: float = 5.0  # backstop beyond an agent's own timeout enforcement
    story_length: int = 0  # >0 keeps a ring of recent transitions for error messages
    run_time_smoothing: float = 0.2  # weight of the newest run time in the moving average
    locality_min_bytes: int = 1 << 20  # kept input bytes on one host that make it the task's home
    locality_slack: int = 4  # a home deque longer than this may be stolen from by other hosts


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
    keep_as: int = 0  # the object its result is kept as (deps.py)
    reads: tuple[int, ...] = ()  # kept objects it reads
    unmet: int = 0  # upstream tasks and objects it still waits for
    home: HostId | None = None  # the host holding its inputs, when queued there for locality


@dataclass(slots=True, eq=False)
class SlotRecord:
    """One slot as the scheduler keeps it: its deque (assigned) and window (sent)."""

    slot_id: SlotId
    host_id: HostId
    capabilities: frozenset[str]
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
    runnable: bool = False  # cached: can some slot (present or expected) ever run it?
    runnable_epoch: int = -1


@dataclass(slots=True)
class SchedulerStats:
    submitted: int = 0
    resolved: int = 0
    steals: int = 0  # deque-to-deque steals
    steal_backs_requested: int = 0
    steal_backs_returned: int = 0
    steal_backs_refused: int = 0
    retries: int = 0
    dropped_results: int = 0


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
