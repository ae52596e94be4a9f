"""The dashboard's view-model: the runtime's events folded into what the screen shows.

No Textual here (harlequin's rule: the core is shared with headless users and tested
without a terminal). The app subscribes `DashboardModel.inbox` to the pool's event bus: it
queues each event on the coordinator's loop and folds them a few dozen at a time
(counters, a dict entry per running task), and each tick of the app's timer `drain`s the
rest (and fills the latency histograms, a batch per kernel, backend and host), drawing
nothing. Each panel then
redraws only when the `Versions` counter of its sections moved since it last drew: that is
the coalescing that keeps a flood of task events from reaching the terminal one by one.

Time comes from an injectable `clock` (monotonic seconds, the same base as the events'
`at`, which is the event loop's clock), so tests and snapshots replay a fixed sequence of
events at fixed instants and get the same screen every time.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from batuta.runtime import events as pe
from batuta.runtime.views import Backend, HostView, SlotView, TaskResult, TaskStatus, gpu_index_of

from .alerts import Alert, evaluate_alerts
from .histogram import LogHistogram
from .rows import (
    HISTORY_S,
    AttemptRow,
    FailedTask,
    GpuRow,
    HostRow,
    JobRow,
    LatencyFilter,
    LogLine,
    RateMeter,
    SlotRow,
    StreamRow,
    Totals,
)

__all__ = [
    "HISTORY_S",
    "AttemptRow",
    "DashboardModel",
    "FailedTask",
    "GpuRow",
    "HostRow",
    "JobRow",
    "LatencyFilter",
    "LogLine",
    "RateMeter",
    "SlotRow",
    "StreamRow",
    "Totals",
]

Clock = Callable[[], float]

RECENT_KEPT = 300  # finished tasks kept for the task stream
FAILURES_KEPT = 200  # failed tasks kept for the detail view
ATTEMPT_LOGS_KEPT = 5_000  # tasks whose earlier attempts (requeues) are remembered
LATENCY_BATCH = 20_000  # finished tasks held before the histograms are filled anyway
# Up to this many (kernel, backend, host) histograms the latency view is merged afresh when
# read; beyond, each batch is added to the merged view as well (re-merging a thousand, at
# 256 hosts, cost 20-45 ms at each redraw of the panel)
LATENCY_MERGE_KEYS = 32
LOGS_KEPT = 1_000
INBOX_FOLD_AT = 64  # queued events are folded as soon as this many wait (see `inbox`)
FAILURE_WINDOW_S = 60.0  # "failing tasks" looks this far back
NO_JOB = "(no job)"
_BACKEND_NAMES_BY_ID: dict[int, str] = {id(backend): backend.value for backend in Backend}  # members are singletons
_SUCCEEDED = TaskStatus.SUCCEEDED
_CANCELLED = TaskStatus.CANCELLED

FAILED_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.LOST, TaskStatus.UNSCHEDULABLE})
RAN_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT})
LATENCY_DIMENSIONS = ("kernel", "backend", "host")


_E = TypeVar("_E")


def _handler(kind: type[_E], handler: Callable[[_E], None]) -> tuple[type, Callable[[Any], None]]:
    """One entry of an event dispatch table, `handler` checked to take events of type `kind`."""
    return kind, handler


class Versions:
    """One counter per screen section; a panel redraws when a counter it watches moved.

    `tasks` moves with every task event (the hot path bumps only this one); the others move
    with the rarer changes of their own section (a host's state, a job started, a filter).
    """

    __slots__ = ("alerts", "hosts", "jobs", "latency", "logs", "slots", "stream", "summary", "tasks")

    def __init__(self) -> None:
        self.hosts = self.jobs = self.slots = self.stream = self.tasks = 0
        self.latency = self.alerts = self.logs = self.summary = 0

    def bump_all(self) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + 1)


class DashboardModel:
    """Everything the dashboard shows, folded from pool events. Feed it with `apply`."""

    def __init__(self, *, clock: Clock = time.monotonic, cluster_label: str = "local") -> None:
        self.clock = clock
        self.cluster_label = cluster_label
        self.versions = Versions()
        self._init_state()
        self._handlers: dict[type, Callable[[Any], None]] = dict(  # the rarer events (see `_fold`)
            [
                _handler(pe.TaskRequeued, self._on_requeued),
                _handler(pe.HostUp, self._on_host_up),
                _handler(pe.HostStateChanged, self._on_host_state),
                _handler(pe.HostDown, self._on_host_down),
                _handler(pe.HostTelemetry, self._on_telemetry),
                _handler(pe.SlotStateChanged, self._on_slot_state),
            ]
        )

    def _init_state(self) -> None:
        """Everything folded from events, empty (`reset` calls it again)."""
        self.status = "starting"  # starting | running | failed | closed
        self.status_detail = ""
        self.paused = False
        self.hosts: dict[str, HostRow] = {}
        self.jobs: dict[str, JobRow] = {}
        self.slots: dict[str, SlotRow] = {}
        self.running: dict[int, pe.TaskStarted] = {}  # insertion order is start order
        self.recent: deque[pe.TaskFinished | pe.TaskRequeued] = deque(maxlen=RECENT_KEPT)
        self.waiting: dict[int, JobRow] = {}  # task id -> its job, while it waits for upstream tasks
        self.failures: OrderedDict[int, FailedTask] = OrderedDict()
        self.alerts: list[Alert] = []
        self.logs: deque[LogLine] = deque(maxlen=LOGS_KEPT)
        self.throughput = RateMeter(HISTORY_S + 1)
        self.latency_filter = LatencyFilter()
        self._log_seq = itertools.count(1)
        self._latency: dict[tuple[str, str, str], tuple[LogHistogram, LogHistogram]] = {}
        self._kernels = pe.KernelNames()  # the latency keys' task names: the first ones, then "other"
        self._latency_pending: list[TaskResult] = []  # finished, not yet in the histograms
        self._latency_cache: tuple[tuple[object, ...], tuple[LogHistogram, LogHistogram]] | None = None
        self._attempts: dict[int, list[AttemptRow]] = {}
        self._recent_failures: deque[tuple[float, int]] = deque()
        self._alert_since: dict[str, float] = {}
        self._slot_signature: tuple[object, ...] = ()
        self._last_half_second: int | None = None
        self._last_alert_second: int | None = None
        # a failure or a job's end re-evaluates the alerts at the next tick, not the next second:
        # the jobs panel showed FAILED 10 beside "all clear" until then
        self._alerts_stale = False
        self._inbox: list[object] = []
        self._folded_early = 0  # events folded by `_receive` since the last `drain`

    # -- feeding ----------------------------------------------------------------------------

    def apply(self, event: object) -> None:
        """Fold one pool event in now (tests, replays). The app uses `inbox` and `drain` instead."""
        self._fold((event,))

    def apply_many(self, events: Iterable[object]) -> None:
        self._fold(events)

    @property
    def inbox(self) -> Callable[[object], None]:
        """A bus subscriber that queues the event and folds the queue every `INBOX_FOLD_AT`.

        The pool calls its subscribers synchronously for every task event, on the loop it
        schedules from. Folding a few dozen at a time keeps that cheap (one batch, not a
        call per event) and keeps the events young: held until the next frame (thousands,
        tens of milliseconds), they outlived the collector's young generations, were promoted
        to the old one and freed there all at once, which made the collector run about a
        quarter more often and its full collections come twice as often. That was the
        largest part of what an attached dashboard cost a pool of short tasks
        (bench/RESULTS.md, `bench/tui_load.py`).
        """
        return self._receive

    def _receive(self, event: object) -> None:
        inbox = self._inbox
        inbox.append(event)
        if len(inbox) >= INBOX_FOLD_AT:
            self._folded_early += len(inbox)
            self._fold(inbox)
            inbox.clear()

    def drain(self) -> int:
        """Fold every queued event in (the app calls this each tick); returns how many were
        folded since the last drain, queued ones included.

        The latency histograms are filled here too, a tick's worth at a time: a short pause
        of the loop each tick rather than a long one whenever the latency panel redraws,
        which would leave the hosts' slots without work for as long.
        """
        inbox = self._inbox
        count = len(inbox) + self._folded_early
        self._folded_early = 0
        if inbox:
            self._fold(inbox)
            inbox.clear()
        if self._latency_pending:
            self._fold_latency()
        return count

    def _fold(self, events: Iterable[object]) -> None:
        """The one place events are folded in. Task events, three per task and thousands a
        second, take the inlined path below (a few counter updates); the latency histograms
        are filled later in batches (`_fold_latency`), when someone looks."""
        jobs = self.jobs
        running = self.running
        recent = self.recent
        pending = self._latency_pending
        throughput = self.throughput
        handlers = self._handlers
        tasks = 0
        for event in events:
            if type(event) is pe.TaskFinished:
                result = event.result
                at = event.at
                job = jobs.get(result.job or NO_JOB) or self._job(result.job)
                if running.pop(result.task_id, None) is not None:
                    job.running -= 1
                if self.waiting:
                    self._stop_waiting(result.task_id)
                status = result.status
                if status is _SUCCEEDED:
                    job.succeeded += 1
                    host = self.hosts.get(result.host) if result.host else None
                    if host is not None:
                        host.done += 1
                    if self._attempts:
                        self._attempts.pop(result.task_id, None)
                elif status is _CANCELLED:
                    job.cancelled += 1
                    if self._attempts:
                        self._attempts.pop(result.task_id, None)
                else:
                    job.failed += 1
                    host = self.hosts.get(result.host) if result.host else None
                    if host is not None:
                        host.done += 1
                        host.failed += 1
                    self._record_failure(result, at)
                second = int(at)
                if second == throughput.second:
                    throughput.counts[-1] += 1
                else:
                    throughput.add(at)
                meter = job.meter
                if second == meter.second:
                    meter.counts[-1] += 1
                else:
                    meter.add(at)
                if result.slot is not None:
                    pending.append(result)
                recent.append(event)
                tasks += 1
            elif type(event) is pe.TaskQueued:
                job = jobs.get(event.job or NO_JOB) or self._job(event.job)
                job.submitted += 1
                if event.waiting_on:  # shown as waiting until it starts or ends
                    job.waiting += 1
                    self.waiting[event.task_id] = job
                if job.started_at is None:
                    job.started_at = event.at
                tasks += 1
            elif type(event) is pe.TaskStarted:
                task_id = event.task_id
                if self.waiting:
                    self._stop_waiting(task_id)
                if task_id not in running:
                    (jobs.get(event.job or NO_JOB) or self._job(event.job)).running += 1
                running[task_id] = event
                tasks += 1
            else:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
        if tasks:
            self.versions.tasks += tasks
        if len(pending) >= LATENCY_BATCH:
            self._fold_latency()

    def _stop_waiting(self, task_id: int) -> None:
        job = self.waiting.pop(task_id, None)
        if job is not None:
            job.waiting -= 1

    def _job(self, name: str) -> JobRow:
        key = name or NO_JOB
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = JobRow(name=key)
            self.versions.jobs += 1
        return job

    def _on_requeued(self, event: pe.TaskRequeued) -> None:
        job = self._job(event.job)
        if self.running.pop(event.task_id, None) is not None:
            job.running -= 1
        job.requeued += 1
        self._remember_attempt(
            event.task_id, AttemptRow(event.attempts, event.slot, f"requeued: {event.reason}", event.at)
        )
        self.recent.append(event)
        self.versions.tasks += 1

    def _remember_attempt(self, task_id: int, row: AttemptRow) -> None:
        attempts = self._attempts.get(task_id)
        if attempts is None:
            if len(self._attempts) >= ATTEMPT_LOGS_KEPT:
                self._attempts.pop(next(iter(self._attempts)))
            attempts = self._attempts[task_id] = []
        attempts.append(row)

    def _record_failure(self, result: TaskResult, at: float) -> None:
        attempts = list(self._attempts.pop(result.task_id, ()))
        attempts.append(AttemptRow(result.attempts, result.slot or "-", result.status.value, at))
        self.failures[result.task_id] = FailedTask(result=result, attempts=tuple(attempts), at=at)
        while len(self.failures) > FAILURES_KEPT:
            self.failures.popitem(last=False)
        self._recent_failures.append((at, result.task_id))
        self._alerts_stale = True
        self.versions.alerts += 1

    def _host(self, name: str) -> HostRow:
        row = self.hosts.get(name)
        if row is None:
            row = self.hosts[name] = HostRow(name=name)
        return row

    def _on_host_up(self, event: pe.HostUp) -> None:
        row = self._host(event.host)
        row.state = "up"
        row.reason = ""
        row.slot_ids = event.slots
        row.gpu_names = event.gpus
        row.cpu_count = event.cpu_count
        row.batuta_version = event.batuta_version
        row.python_version = event.python_version
        row.last_heard = event.at
        self.versions.hosts += 1
        self.versions.summary += 1

    def _on_host_state(self, event: pe.HostStateChanged) -> None:
        row = self._host(event.host)
        row.state = event.state
        row.reason = event.reason
        if event.state == "up":
            row.last_heard = event.at
        self.versions.hosts += 1
        self.versions.summary += 1

    def _on_host_down(self, event: pe.HostDown) -> None:
        row = self._host(event.host)
        row.state = "lost"
        row.reason = event.reason
        self.versions.hosts += 1
        self.versions.summary += 1

    def _on_telemetry(self, event: pe.HostTelemetry) -> None:
        row = self._host(event.host)
        row.cpu_percent = event.cpu_percent
        row.memory_used = event.memory_used
        row.memory_total = event.memory_total
        row.gpu_status = event.gpu_status
        row.objects, row.object_bytes, row.spilled_bytes = event.objects, event.object_bytes, event.spilled_bytes
        row.last_heard = event.at
        row.telemetry_seen = True
        gpus = row.gpus
        for reading in event.gpus:
            gpu = gpus.get(reading.index)
            if gpu is None:
                gpu = gpus[reading.index] = GpuRow(index=reading.index, name=reading.name)
            gpu.record(reading, event.at)
        self.versions.hosts += 1

    def _on_slot_state(self, event: pe.SlotStateChanged) -> None:
        row = self.slots.get(event.slot)
        if row is not None:
            row.state = event.state
            self.versions.slots += 1

    # -- what the app tells the model -------------------------------------------------------

    def update_slots(self, views: Iterable[SlotView]) -> None:
        """Take a fresh `Pool.slots()` snapshot (polled: the scheduler publishes no slot events)."""
        rows = {
            v.slot_id: SlotRow(
                slot_id=v.slot_id,
                host=v.host_id,
                kind="gpu" if "gpu" in v.capabilities else "cpu",
                state=v.state,
                deque_depth=v.deque_depth,
                in_flight=v.in_flight,
                window_limit=v.window_limit,
                steals_in=v.steals_in,
                steals_out=v.steals_out,
                completed=v.completed,
                mean_run_s=v.mean_run_s,
                gpu_index=gpu_index_of(v.capabilities),
            )
            for v in views
        }
        signature = tuple(
            (
                r.slot_id,
                r.state,
                r.deque_depth,
                r.in_flight,
                r.window_limit,
                r.steals_in,
                r.steals_out,
                r.completed,
                r.gpu_index,
            )
            for r in rows.values()
        )
        if signature == self._slot_signature:
            return
        self._slot_signature = signature
        self.slots = rows
        slot_gpus: dict[str, set[int]] = {}
        unknown: set[str] = set()  # hosts with a GPU slot whose GPU is not known: every GPU stays on show
        for r in rows.values():
            gpus = slot_gpus.setdefault(r.host, set())
            if r.gpu_index is not None:
                gpus.add(r.gpu_index)
            elif r.kind == "gpu":
                unknown.add(r.host)
        for host in self.hosts.values():
            if not host.slot_ids:
                host.slot_ids = tuple(r.slot_id for r in rows.values() if r.host == host.name)
            used = slot_gpus.get(host.name)
            known = None if used is None or host.name in unknown else frozenset(used)
            if known != host.slot_gpus:
                host.slot_gpus = known
                self.versions.hosts += 1
        self.versions.slots += 1

    def seed_hosts(self, views: Iterable[HostView]) -> None:
        """Learn hosts that came up before the model subscribed (from `Pool.hosts()`)."""
        now = self.clock()
        for view in views:
            if view.name in self.hosts:
                continue
            row = self._host(view.name)
            row.state = view.state
            row.gpu_names = tuple(view.gpus)
            row.cpu_count = view.cpu_count
            row.last_heard = now
        self.versions.hosts += 1
        self.versions.summary += 1

    def set_status(self, status: str, detail: str = "") -> None:
        self.status = status
        self.status_detail = detail
        self.versions.summary += 1

    def set_paused(self, paused: bool) -> None:
        if paused != self.paused:
            self.paused = paused
            self.versions.summary += 1

    def job_started(self, name: str, origin: str) -> JobRow:
        """A job runner started job `name` (before its first task is queued)."""
        job = self._job(name)
        job.origin = origin
        job.state = "running"
        job.started_at = job.started_at if job.started_at is not None else self.clock()
        self.versions.jobs += 1
        return job

    def job_ended(self, name: str, state: str, message: str = "") -> None:
        """The job's `main` returned ("done"), raised ("failed") or was cancelled."""
        job = self._job(name)
        job.state = state
        job.message = message
        job.ended_at = self.clock()
        self.versions.jobs += 1
        self._alerts_stale = True  # its failures become an alert (alerts.py) in the same frame as its row

    def add_log(self, level: int, logger: str, message: str, created: float | None = None) -> None:
        """Append a log line (bounded); called by the logging bridge."""
        self.logs.append(
            LogLine(
                seq=next(self._log_seq),
                created=time.time() if created is None else created,
                level=level,
                logger=logger,
                message=message,
            )
        )
        self.versions.logs += 1

    # -- an attached dashboard (batuta/tui/attach.py) rebuilds the model from a snapshot ---

    def reset(self) -> None:
        """Forget everything folded so far (the clock, label and handlers stay); every panel redraws."""
        self._init_state()
        self.versions.bump_all()

    def restore_job(self, row: JobRow) -> None:
        self.jobs[row.name] = row
        self.versions.jobs += 1

    def restore_host_counts(self, host: str, done: int, failed: int) -> None:
        row = self._host(host)
        row.done += done
        row.failed += failed

    def restore_latency(self, key: tuple[str, str, str], queue: LogHistogram, run: LogHistogram) -> None:
        if key[0] != pe.OTHER_KERNEL:  # the coordinator's kept names, kept here too
            self._kernels.key(key[0])
        self._latency[key] = (queue, run)
        self.versions.latency += 1

    def restore_failure(self, result: TaskResult, at: float) -> None:
        """A failure whose task events are no longer kept: listed, not counted again."""
        self._record_failure(result, at)

    # -- time -------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Advance what depends on time alone: ages, rates, ETAs (2 Hz) and alerts (1 Hz)."""
        now = self.clock() if now is None else now
        half = int(now * 2)
        if half != self._last_half_second:
            self._last_half_second = half
            versions = self.versions
            versions.hosts += 1
            versions.summary += 1
            if any(job.state == "running" for job in self.jobs.values()):
                versions.jobs += 1
            if self.running:
                versions.stream += 1
        second = int(now)
        if second != self._last_alert_second or self._alerts_stale:
            self._last_alert_second = second
            self.refresh_alerts(now)

    def refresh_alerts(self, now: float) -> None:
        """Re-evaluate the alert rules; an alert shows once its condition held `hold_s`."""
        window_start = now - FAILURE_WINDOW_S
        while self._recent_failures and self._recent_failures[0][0] < window_start:
            self._recent_failures.popleft()
        self._alerts_stale = False
        candidates = evaluate_alerts(self, now)
        since = self._alert_since
        keys = {alert.key for alert in candidates}
        for key in [k for k in since if k not in keys]:
            del since[key]
        shown = []
        for alert in candidates:
            first = since.setdefault(alert.key, now)
            if now - first >= alert.hold_s:
                shown.append(alert.with_since(first))
        if shown != self.alerts:
            self.alerts = shown
            self.versions.alerts += 1

    @property
    def recent_failure_ids(self) -> list[int]:
        """Task ids that failed within the last `FAILURE_WINDOW_S`, oldest first."""
        return [task_id for _at, task_id in self._recent_failures]

    # -- views ------------------------------------------------------------------------------

    @property
    def totals(self) -> Totals:
        """Task counts over every job (summed on demand: the hot path counts per job only)."""
        totals = Totals()
        for job in self.jobs.values():
            totals.submitted += job.submitted
            totals.succeeded += job.succeeded
            totals.failed += job.failed
            totals.cancelled += job.cancelled
            totals.requeued += job.requeued
        return totals

    @property
    def running_count(self) -> int:
        return len(self.running)

    @property
    def queued_count(self) -> int:
        return sum(job.queued for job in self.jobs.values())

    def hosts_up(self) -> int:
        return sum(1 for host in self.hosts.values() if host.state in ("up", "draining", "drained", "unfit"))

    def busy_slots(self) -> dict[str, int]:
        """Slot ids with a task running on them now, with how many."""
        busy: dict[str, int] = {}
        for started in self.running.values():
            busy[started.slot] = busy.get(started.slot, 0) + 1
        return busy

    def slot_count(self) -> int:
        return sum(len(host.slot_ids) for host in self.hosts.values() if host.state not in pe.HOST_GONE_STATES)

    def stream(self, limit: int) -> list[StreamRow]:
        """The task stream: tasks running now (longest-running first), then the latest endings.

        Running tasks take at most half the lines when there are endings to show, so the
        stream always shows both what runs and what just finished.
        """
        rows: list[StreamRow] = []
        recent = self.recent
        running_lines = min(len(self.running), limit if not recent else max(1, limit // 2))
        for started in itertools.islice(self.running.values(), running_lines):
            rows.append(StreamRow(started.task_id, started.name, started.job, started.slot, "running", started.at))
        for entry in reversed(recent):
            if len(rows) >= limit:
                break
            if isinstance(entry, pe.TaskFinished):
                result = entry.result
                rows.append(
                    StreamRow(
                        result.task_id,
                        result.name,
                        result.job,
                        result.slot or "-",
                        result.status.value,
                        entry.at,
                        run_s=result.duration if result.slot else None,
                        detail=result.error or "",
                    )
                )
            else:
                rows.append(
                    StreamRow(
                        entry.task_id, entry.name, entry.job, entry.slot, "requeued", entry.at, detail=entry.reason
                    )
                )
        return rows

    def live_jobs(self) -> list[JobRow]:
        return [job for job in self.jobs.values() if job.state == "running"]

    def latency_choices(self) -> dict[str, list[str]]:
        """The values each latency filter dimension can take (kernels, backends, hosts seen)."""
        self._fold_latency()
        keys = list(self._latency)
        return {dimension: sorted({key[index] for key in keys}) for index, dimension in enumerate(LATENCY_DIMENSIONS)}

    def cycle_latency_filter(self, dimension: str) -> str | None:
        """Step `dimension` of the latency filter to its next value (all, then each seen)."""
        if dimension not in LATENCY_DIMENSIONS:
            raise ValueError(f"unknown latency dimension {dimension!r}; one of {', '.join(LATENCY_DIMENSIONS)}")
        choices: list[str | None] = [None, *self.latency_choices()[dimension]]
        current = self.latency_filter.get(dimension)
        position = choices.index(current) if current in choices else 0
        value = choices[(position + 1) % len(choices)]
        self.set_latency_filter(dimension, value)
        return value

    def set_latency_filter(self, dimension: str, value: str | None) -> None:
        setattr(self.latency_filter, dimension, value)
        self.versions.latency += 1

    def _fold_latency(self) -> None:
        """Put the finished tasks waiting in `_latency_pending` into the histograms, a batch
        per (kernel, backend, host).

        Enum members hash in Python (`Enum.__hash__`), twice per task here once, so statuses
        are compared by identity and backends named through their `id`; and results mostly
        come in runs of one kernel on one host, so a run reuses the previous lookup.
        """
        pending = self._latency_pending
        if not pending:
            return
        self._latency_pending = []
        groups: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
        ran = RAN_STATUSES
        backend_names = _BACKEND_NAMES_BY_ID
        last: tuple[str, object, str | None] | None = None
        waits: list[float] = []
        runs: list[float] = []
        for result in pending:
            status = result.status
            if status is not _SUCCEEDED and status not in ran:
                continue
            name, backend, host = result.name, result.backend, result.host
            if last is None or name != last[0] or backend is not last[1] or host != last[2]:
                last = (name, backend, host)
                key = (self._kernels.key(name), backend_names.get(id(backend), "?"), host or "?")
                group = groups.get(key)
                if group is None:
                    group = groups[key] = ([], [])
                waits, runs = group
            waits.append(result.queue_wait)
            runs.append(result.duration)
        by_key = self._latency
        for key, (queue_waits, durations) in groups.items():
            pair = by_key.get(key)
            if pair is None:
                pair = by_key[key] = (LogHistogram(), LogHistogram())
            pair[0].add_many(queue_waits)
            pair[1].add_many(durations)
        self.versions.latency += 1
        cache = self._latency_cache
        if cache is not None and len(by_key) > LATENCY_MERGE_KEYS and cache[0][0] == self.versions.latency - 1:
            # many histograms: the batch goes into the merged view too, which is then still current
            (_version, *wanted), (queue, run) = cache  # wanted: (kernel, backend, host), as the keys
            chosen = [
                pair
                for key, pair in groups.items()
                if all(want in (None, have) for want, have in zip(wanted, key, strict=True))
            ]
            queue.add_many([value for waits, _runs in chosen for value in waits])  # one batch, not one a key
            run.add_many([value for _waits, runs in chosen for value in runs])
            self._latency_cache = ((self.versions.latency, *wanted), cache[1])

    def latency(self) -> tuple[LogHistogram, LogHistogram]:
        """(queue wait, run time) histograms of the tasks the latency filter selects (the
        model's own: read them now, they keep counting)."""
        self._fold_latency()
        wanted = self.latency_filter
        cache_key = (self.versions.latency, wanted.kernel, wanted.backend, wanted.host)
        if self._latency_cache is not None and self._latency_cache[0] == cache_key:
            return self._latency_cache[1]
        chosen = [
            pair
            for (kernel, backend, host), pair in self._latency.items()
            if wanted.kernel in (None, kernel) and wanted.backend in (None, backend) and wanted.host in (None, host)
        ]
        queue = LogHistogram.merged(pair[0] for pair in chosen)
        run = LogHistogram.merged(pair[1] for pair in chosen)
        self._latency_cache = (cache_key, (queue, run))
        return queue, run

    def failure(self, task_id: int) -> FailedTask | None:
        return self.failures.get(task_id)

    def last_failure_of(self, job: str) -> FailedTask | None:
        """Job `job`'s latest failed task still kept (`FAILURES_KEPT`), if any."""
        return next((failed for failed in reversed(self.failures.values()) if failed.result.job == job), None)

    def latest_failures(self, limit: int = 50) -> Iterator[FailedTask]:
        """The most recent failed tasks, newest first."""
        return itertools.islice(reversed(self.failures.values()), limit)
