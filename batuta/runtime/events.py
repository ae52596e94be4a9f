"""The runtime's public events and the bus that fans them out to observers.

Observers (the TUI's view-model, Prometheus metrics, logs, checkpoint journals) subscribe
here and nowhere else. Callbacks run synchronously on the coordinator's event loop, so they
must be quick and must not block; an observer that raises is logged and skipped, never
allowed to take the coordinator down. Event objects are only built when someone listens.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from batuta.core.task import TaskResult

log = logging.getLogger("batuta.runtime.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQueued:
    task_id: int
    name: str
    backend: str
    at: float
    backend_reason: str = ""
    job: str = ""
    waiting_on: tuple[int, ...] = ()  # unfinished upstream tasks whose results it needs first


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStarted:
    task_id: int
    name: str
    host: str
    slot: str
    attempt: int
    at: float
    job: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequeued:
    task_id: int
    name: str
    slot: str
    attempts: int
    reason: str
    at: float
    job: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFinished:
    result: TaskResult
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuReading:
    index: int
    name: str
    utilization: float | None
    memory_used: int | None
    memory_total: int | None
    temperature: float | None
    power: float | None
    cached_values: int = 0  # values resident in the GPU slots' device caches on this GPU
    cached_bytes: int = 0  # their bytes on the card
    cache_cap: int = 0  # those caches' cap in bytes; 0: no GPU slot reported a device cache


@dataclass(frozen=True, slots=True, kw_only=True)
class HostUp:
    host: str
    slots: tuple[str, ...]
    gpus: tuple[str, ...]
    cpu_count: int
    batuta_version: str
    python_version: str
    at: float


# Observers that keep something per kernel (metrics' label, the dashboard's latency
# histograms, a served coordinator's history of them) keep it for the first KERNELS_KEPT task
# names and fold the rest into OTHER_KERNEL: a task's name is its label when it has one, free
# text (`label=f"chunk-{i}"`), and one entry a task grew them without bound.
KERNELS_KEPT = 100
OTHER_KERNEL = "other"


class KernelNames:
    """A task's name as a per-kernel key: itself for the first `kept` names seen, else "other"."""

    __slots__ = ("_kept", "_names")

    def __init__(self, kept: int = KERNELS_KEPT) -> None:
        self._kept = kept
        self._names: set[str] = set()

    def key(self, name: str) -> str:
        names = self._names
        if name in names:
            return name
        if len(names) < self._kept:
            names.add(name)
            return name
        return OTHER_KERNEL


# A host's states after which it is not up: lost or retired by liveness, closed with its pool,
# or unreachable (a launch or a relaunch after a loss failed; it is tried again).
HOST_GONE_STATES = frozenset({"lost", "retired", "closed", "unreachable"})


@dataclass(frozen=True, slots=True, kw_only=True)
class HostStateChanged:
    """A host became suspected (missed heartbeats), lost, draining, drained or up again."""

    host: str
    state: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HostDown:
    host: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HostTelemetry:
    host: str
    cpu_percent: float
    memory_used: int
    memory_total: int
    gpus: tuple[GpuReading, ...]
    gpu_status: str
    at: float
    objects: int = 0  # in the host agent's object store (put and kept values)
    object_bytes: int = 0
    spilled_bytes: int = 0  # of those bytes, on the host's disk past its memory cap
    slot_object_bytes: int = 0  # kept bytes that ever left the slot process that made them


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotStateChanged:
    host: str
    slot: str
    state: str
    reason: str
    at: float


PoolEvent = (
    TaskQueued
    | TaskStarted
    | TaskRequeued
    | TaskFinished
    | HostUp
    | HostStateChanged
    | HostDown
    | HostTelemetry
    | SlotStateChanged
)

Subscriber = Callable[[PoolEvent], None]


@dataclass(slots=True)
class EventBus:
    """Synchronous fan-out with a cheap `active` check for the hot path."""

    _subscribers: list[Subscriber] = field(default_factory=list)
    errors: int = 0
    # (subscriber id, event type, exception type) already logged: a callback with a bug fails
    # on every event, and a traceback each was a flood of hundreds of thousands of lines
    _logged: set[tuple[int, str, str]] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
                self._logged = {key for key in self._logged if key[0] != id(callback)}  # ids are reused

        return unsubscribe

    def publish(self, event: PoolEvent) -> None:
        for callback in tuple(self._subscribers):
            try:
                callback(event)
            except Exception as exc:  # an observer's bug must not take the coordinator down
                self.errors += 1
                key = (id(callback), type(event).__name__, type(exc).__name__)
                if key not in self._logged:
                    self._logged.add(key)
                    log.exception(
                        "event subscriber %r failed on %s (its later %s failures on these are counted, "
                        "not logged: pool.events.errors)",
                        callback,
                        key[1],
                        key[2],
                    )

    def stream(self, max_buffered: int = 10_000) -> EventStream:
        """An async iterator of events; if the consumer falls behind, the oldest are dropped."""
        return EventStream(self, max_buffered)


class EventStream:
    """Bounded async view of the bus (drops oldest, counts drops): never blocks the coordinator."""

    def __init__(self, bus: EventBus, max_buffered: int) -> None:
        self._buffer: deque[PoolEvent] = deque(maxlen=max_buffered)
        self._wakeup = asyncio.Event()
        self.dropped = 0
        self._closed = False
        self._unsubscribe = bus.subscribe(self._push)

    def _push(self, event: PoolEvent) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(event)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[PoolEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PoolEvent]:
        while True:
            while self._buffer:
                yield self._buffer.popleft()
            if self._closed:
                return
            self._wakeup.clear()
            await self._wakeup.wait()
