"""Scheduler inputs (events, past tense) and outputs (instructions, imperative).

The runtime turns what it hears from host agents and users into events, feeds them to
`Scheduler.handle(event, now)`, and carries out the instructions that come back. Both are
frozen, slotted, keyword-only dataclasses: plain facts, cheap to build, safe to log. What
an agent says is an event named for the report (`TaskStartReported`), so that no name here
repeats one of the runtime's own events for observers (`batuta.runtime.events`).
"""

from __future__ import annotations

from dataclasses import dataclass

from batuta.core.task import CAP_CPU, Outcome, TaskStatus

SlotId = str
HostId = str


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSubmitted:
    """A user submitted a task. `requires` are the capabilities a slot must offer.

    Dependencies (see `deps.py`): `after`, unresolved tasks whose success it waits for;
    `reads`, kept objects it reads (it waits until they exist, and runs where they are);
    `keep_as`, the object its result is kept as on the host that makes it (0: none);
    `puts`, the put values it reads, each with its size in bytes (never waited for: they are
    at the coordinator, but a GPU task prefers a slot that already holds a copy on its card)."""

    task_id: int
    priority: int = 1
    requires: frozenset[str] = frozenset({CAP_CPU})
    timeout: float | None = None
    max_attempts: int = 3
    after: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()
    keep_as: int = 0
    puts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotJoined:
    """A worker slot is ready (new, or back after its host was lost)."""

    slot_id: SlotId
    host_id: HostId
    capabilities: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostExpected:
    """A host is configured and starting: tasks it could run wait for it instead of failing.

    Sent again when the host is up, with what its slots offer: from then on that is what it
    is expected back with, and work only the configuration promised fails as unschedulable."""

    host_id: HostId
    slot_capabilities: tuple[frozenset[str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotLost:
    """A slot stopped (its worker or host died). `retired`: it will never come back.
    `handed_back`: its agent gave it up and says no task it held there had started."""

    slot_id: SlotId
    reason: str
    retired: bool = False
    handed_back: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HostLost:
    """Every slot of a host stopped. `retired`: the host will not be relaunched."""

    host_id: HostId
    reason: str
    retired: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStartReported:
    """The slot's agent reported that the task began running there (a `Started` message)."""

    task_id: int
    slot_id: SlotId


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOutcomeReported:
    """The slot's agent reported how an attempt of the task ended there (a `TaskOutcome`)."""

    task_id: int
    slot_id: SlotId
    attempt: int
    outcome: Outcome
    run_s: float = 0.0
    reason: str = ""
    payload: object = None  # what the agent sent (value, output); carried to ResolveTask, never read
    kept_bytes: int = 0  # the bytes of the result it kept on its host (TaskSubmitted.keep_as)


@dataclass(frozen=True, slots=True, kw_only=True)
class StealBackAnswered:
    """The agent returned `returned` unstarted from `slot_id`; `refused` had started."""

    slot_id: SlotId
    returned: tuple[int, ...]
    refused: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested:
    task_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired:
    """The time returned by `Scheduler.next_wakeup()` has come."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulingPaused:
    """Stop sending new work (running work continues); with `recall`, ask the agents back for
    the tasks they hold that have not started, so that nothing new starts (a user's pause)."""

    recall: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulingResumed:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class HostDrainRequested:
    """Send the host no more work; tell when its in-flight work is done. `undo`: give it
    work again (a drained host, or one still draining)."""

    host_id: HostId
    undo: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSuspected:
    """The host has been silent past `suspect_after` (not lost yet): it gets only work that no
    host up and heard from can run (`suspicion.py`). `heard_again`: it spoke again, or came back."""

    host_id: HostId
    heard_again: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownRequested:
    """The pool is closing: resolve every unresolved task as cancelled and place no more work."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundTripMeasured:
    """The runtime measured the round trip to a host; windows are sized to hide it."""

    host_id: HostId
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectReleased:
    """The runtime dropped a kept object: no task reads it any more, and it is never remade."""

    object_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectLost:
    """A kept object cannot be made again (its lineage is gone): the tasks reading it fail."""

    object_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptObjectsLost:
    """Kept objects on `host_id` are gone while the host stays (the slot process holding
    them died): their producers run again (lineage), as for a lost host."""

    host_id: HostId
    object_ids: tuple[int, ...]
    reason: str


Event = (
    TaskSubmitted
    | SlotJoined
    | HostExpected
    | SlotLost
    | HostLost
    | TaskStartReported
    | TaskOutcomeReported
    | StealBackAnswered
    | CancelRequested
    | TimerFired
    | SchedulingPaused
    | SchedulingResumed
    | HostDrainRequested
    | HostSuspected
    | ShutdownRequested
    | RoundTripMeasured
    | ObjectReleased
    | ObjectLost
    | KeptObjectsLost
)


# -- instructions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTasks:
    """Send these tasks to the slot's host, in order; `attempts[i]` is task i's attempt number.
    `made_ahead`: kept objects some of them read that tasks sent to this slot before them will
    make there (fed ahead, `feedahead.py`): the runtime neither sends nor fetches those."""

    slot_id: SlotId
    task_ids: tuple[int, ...]
    attempts: tuple[int, ...]
    made_ahead: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()  # tail tasks (`tailfeed.py`): fed to the slot process only once it is idle


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestStealBack:
    """Ask the slot's agent to give back these tasks if they have not started."""

    slot_id: SlotId
    task_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortTasks:
    """Tell the slot's agent to drop or kill these tasks (cancelled or timed out)."""

    slot_id: SlotId
    task_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveTask:
    """Resolve the task with its final status. Issued exactly once per task id."""

    task_id: int
    status: TaskStatus
    slot_id: SlotId | None
    attempts: int
    reason: str = ""
    payload: object = None  # the finishing report's payload, when an agent's report decided it


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceRequeue:
    """Tell observers a task went back to the queue (its slot was lost); it runs nowhere now."""

    task_id: int
    slot_id: SlotId
    attempts: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceDrained:
    """Tell observers that a host asked to drain has no work left."""

    host_id: HostId


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceUnfit:
    """Tell observers that a host failed a task for a reason of its own and takes no new work
    (`hostfit.py`), or, `lifted`, that it takes work again: no other host can run what waits."""

    host_id: HostId
    reason: str
    lifted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RecomputeObject:
    """A kept object was lost with its host: submit the task that made it (`task_id`) again,
    as a new task with the same `keep_as=object_id` (lineage)."""

    object_id: int
    task_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceObjectLost:
    """A kept object was lost once more than its producer's attempts allow: it is never made
    again, and `pool.get` says why (its readers in the scheduler fail with the same reason)."""

    object_id: int
    reason: str


Instruction = (
    SendTasks
    | RequestStealBack
    | AbortTasks
    | ResolveTask
    | AnnounceRequeue
    | AnnounceDrained
    | AnnounceUnfit
    | RecomputeObject
    | AnnounceObjectLost
)
