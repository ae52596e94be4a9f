"""The view-model's rows: one dataclass per thing a panel lists (host, GPU, job, slot, ...).

Plain data with the few derived numbers each row needs (a job's ETA, a GPU's history with
gaps), filled by `DashboardModel` and read by the drawing code. No Textual, no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batuta.runtime import events as pe
from batuta.runtime.views import TaskResult

HISTORY_S = 60  # GPU utilisation history and the throughput sparkline
RATE_WINDOW_S = 5  # rates are averaged over this many seconds


class RateMeter:
    """Events per whole second over a sliding window: O(1) to add, a list for sparklines.

    `counts[-1]` is the count of `second`, the latest second seen; the model's hot path
    increments it directly when an event falls in that second and calls `add` otherwise.
    """

    __slots__ = ("counts", "first_at", "second")

    def __init__(self, seconds: int = HISTORY_S) -> None:
        self.counts: deque[int] = deque([0] * seconds, maxlen=seconds)
        self.second: int | None = None
        self.first_at: float | None = None

    def add(self, at: float, count: int = 1) -> None:
        second = int(at)
        if second != self.second:
            if self.second is not None and second < self.second:  # late event: count it now
                self.counts[-1] += count
                return
            self._advance(second)
            if self.first_at is None:
                self.first_at = at
        self.counts[-1] += count

    def _advance(self, second: int) -> None:
        if self.second is None:
            self.second = second
            return
        steps = min(second - self.second, len(self.counts))
        for _ in range(steps):
            self.counts.append(0)
        self.second = second

    def series(self, now: float) -> list[int]:
        """Counts per second, oldest first; the last one is the current (partial) second."""
        if self.second is not None and int(now) > self.second:
            self._advance(int(now))
        return list(self.counts)

    def rate(self, now: float, window: int = RATE_WINDOW_S) -> float:
        """Events per second over the last `window` seconds (less while the meter is young)."""
        if self.first_at is None:
            return 0.0
        series = self.series(now)
        count = sum(series[-(window + 1) :])
        span = min(window + (now - int(now)), now - self.first_at)
        return count / span if span > 0.2 else 0.0


@dataclass(slots=True)
class GpuRow:
    """One GPU of a host: the latest reading (None = NVML could not read it) and its history."""

    index: int
    name: str
    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    temperature: float | None = None
    power: float | None = None
    cached_values: int = 0  # values its GPU slots keep on the card (their device caches)
    cached_bytes: int = 0
    cache_cap: int = 0
    history: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_S))
    history_second: int | None = None

    def record(self, reading: pe.GpuReading, at: float) -> None:
        self.name = reading.name or self.name
        self.utilization = reading.utilization
        self.memory_used = reading.memory_used
        self.memory_total = reading.memory_total
        self.temperature = reading.temperature
        self.power = reading.power
        self.cached_values = reading.cached_values
        self.cached_bytes = reading.cached_bytes
        self.cache_cap = reading.cache_cap
        second = int(at)
        if self.history_second is not None and second == self.history_second:
            self.history[-1] = reading.utilization
            return
        if self.history_second is not None and second > self.history_second:
            for _ in range(min(second - self.history_second - 1, HISTORY_S)):
                self.history.append(None)  # seconds without a reading stay visible as gaps
        self.history.append(reading.utilization)
        self.history_second = second

    def utilization_history(self, now: float) -> list[float | None]:
        """`HISTORY_S` values, one per second, oldest first; None where there was no reading."""
        values = list(self.history)
        if self.history_second is not None:  # the current second's reading may still be on its way
            values.extend([None] * min(max(0, int(now) - self.history_second - 1), HISTORY_S))
        values = values[-HISTORY_S:]
        return [None] * (HISTORY_S - len(values)) + values

    @property
    def memory_fraction(self) -> float | None:
        if self.memory_used is None or not self.memory_total:
            return None
        return self.memory_used / self.memory_total


@dataclass(slots=True)
class HostRow:
    """One host as the nodes panel shows it."""

    name: str
    state: str = "starting"
    reason: str = ""
    slot_ids: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()
    cpu_count: int = 0
    batuta_version: str = ""
    python_version: str = ""
    cpu_percent: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    gpu_status: str = ""  # why there is no GPU data ("no NVIDIA driver"); "" when there is
    objects: int = 0  # in its agent's object store (put and kept values)
    object_bytes: int = 0
    spilled_bytes: int = 0  # of those bytes, on its disk past the store's memory cap
    gpus: dict[int, GpuRow] = field(default_factory=dict)  # every GPU its agent reports, batuta's or not
    slot_gpus: frozenset[int] | None = None  # the GPUs its slots run on; None until its slots are seen
    last_heard: float | None = None
    telemetry_seen: bool = False
    done: int = 0
    failed: int = 0

    def heartbeat_age(self, now: float) -> float | None:
        return None if self.last_heard is None else max(0.0, now - self.last_heard)

    def used_gpus(self) -> list[GpuRow]:
        """Its GPUs that a slot runs on, by index (every one while its slots are not known):
        the others of a shared host (`gpus = [0, 2]` of four) are not batuta's to show."""
        used = self.slot_gpus
        return sorted((g for g in self.gpus.values() if used is None or g.index in used), key=lambda g: g.index)

    def unused_gpus(self) -> list[int]:
        """The indices of its GPUs that no slot runs on."""
        used = self.slot_gpus
        return [] if used is None else sorted(i for i in self.gpus if i not in used)


@dataclass(slots=True)
class JobRow:
    """One job (the tasks submitted under one `Pool.job(name)` label) and its progress."""

    name: str
    origin: str = ""
    state: str = "running"  # running | done | failed | cancelled
    message: str = ""
    submitted: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    requeued: int = 0
    waiting: int = 0  # submitted, waiting for upstream tasks' results (not yet queued to run)
    started_at: float | None = None
    ended_at: float | None = None
    meter: RateMeter = field(default_factory=lambda: RateMeter(RATE_WINDOW_S * 2 + 2))

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def queued(self) -> int:
        return max(0, self.submitted - self.running - self.finished - self.waiting)

    @property
    def progress(self) -> float:
        return self.finished / self.submitted if self.submitted else 0.0

    def rate(self, now: float) -> float:
        return self.meter.rate(now)

    def eta(self, now: float) -> float | None:
        """Seconds until the tasks submitted so far are done, at the current rate."""
        left = self.submitted - self.finished
        if left <= 0:
            return 0.0
        rate = self.rate(now)
        return left / rate if rate > 0 else None

    def elapsed(self, now: float) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at if self.ended_at is not None else now) - self.started_at


@dataclass(slots=True)
class SlotRow:
    """One worker slot, from the scheduler's view (polled), plus its live state (events)."""

    slot_id: str
    host: str
    kind: str  # "gpu" or "cpu"
    state: str
    deque_depth: int
    in_flight: int
    window_limit: int
    steals_in: int
    steals_out: int
    completed: int
    mean_run_s: float | None
    gpu_index: int | None = None  # the GPU a GPU slot runs on (None: a CPU slot, or not known)


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One attempt of a task: where it ran and how that attempt ended."""

    attempt: int
    slot: str
    outcome: str
    at: float


@dataclass(frozen=True, slots=True)
class FailedTask:
    """What the task detail view shows: the final result and every attempt before it."""

    result: TaskResult
    attempts: tuple[AttemptRow, ...]
    at: float


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    created: float  # wall-clock seconds (from the logging record)
    level: int
    logger: str
    message: str


@dataclass(frozen=True, slots=True)
class StreamRow:
    """One line of the task stream: a running task, a finished one, or a requeue."""

    task_id: int
    name: str
    job: str
    slot: str
    state: str  # "running", "requeued", or a TaskStatus value
    at: float  # when it started (running) or ended
    run_s: float | None = None
    detail: str = ""


@dataclass(slots=True)
class Totals:
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    requeued: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


@dataclass(slots=True)
class LatencyFilter:
    """Which tasks the latency panel shows; None in a dimension means all."""

    kernel: str | None = None
    backend: str | None = None
    host: str | None = None

    def get(self, dimension: str) -> str | None:
        value: str | None = getattr(self, dimension)
        return value
