"""Prometheus metrics for a pool: task outcomes and latencies, queues, slots, hosts, GPUs.

    exporter = MetricsExporter(pool).attach()
    host, port = exporter.serve(9464)          # http://127.0.0.1:9464/metrics
    ...
    exporter.freeze()                          # the job is over: keep its final numbers
    exporter.write_textfile("batuta.prom")     # for node-exporter's textfile collector
    exporter.close()

Two kinds of metric, by where their numbers live:

* **Event-driven** (task counts, duration and queue-wait histograms, GPU busy seconds): the
  exporter subscribes to the pool's event bus and updates prometheus-client objects in the
  callback, which runs on the event loop and costs a dict lookup and an `inc()`/`observe()`.
* **Read at scrape time** (queue depth, slots by state, steals, retries, dropped results,
  host up, the latest CPU and GPU readings): a custom collector reads the pool's public views
  (`stats()`, `slots()`, `hosts()`). The pool lives on the event loop and is not thread-safe,
  while the HTTP server answers in its own thread, so a scrape from another thread asks the
  loop for a snapshot (`call_soon_threadsafe`) and waits for it, at most
  `SNAPSHOT_TIMEOUT_S`; a loop too busy to answer gets the previous snapshot instead. The
  scrape thread waits, never the loop.

Every exporter has its own `CollectorRegistry`: no global state, so two pools (or two tests)
never share a counter. Its counters and histograms have no `<name>_created` series (when each
label set was first seen: noise beside every series, `_NoCreated`), without touching
prometheus_client's process-wide switch, which the user's own metrics follow. Label sets are
bounded: outcome, backend, host, slot, GPU index, and the kernel name, which is capped at
`KERNELS_KEPT` distinct values (then "other", batuta/runtime/events.py), because a task's label
is free text. A task id is never a label.

Metric names (prefix `batuta_`):

| name | type | labels |
|---|---|---|
| `tasks_total` | counter | outcome, kernel, backend, host |
| `task_duration_seconds` | histogram | kernel, backend |
| `task_queue_wait_seconds` | histogram | backend |
| `tasks_submitted_total` | counter | |
| `steals_total`, `steal_backs_total` | counter | |
| `task_retries_total`, `task_requeues_total`, `dropped_results_total`, `tasks_fed_ahead_total` | counter | |
| `queue_depth`, `tasks_in_flight`, `tasks_waiting` | gauge | |
| `object_relayed_bytes_total`, `object_fetched_bytes_total` | counter | |
| `slot_queue_depth`, `slot_in_flight` | gauge | host, slot |
| `slots` | gauge | state |
| `host_up` | gauge | host |
| `host_state` | gauge (1 for the current state) | host, state |
| `host_cpu_utilization_ratio` | gauge | host |
| `host_memory_used_bytes`, `host_memory_total_bytes` | gauge | host |
| `host_objects`, `host_object_bytes`, `host_object_spilled_bytes` | gauge | host |
| `gpu_info` | gauge (always 1) | host, gpu, name |
| `gpu_utilization_ratio` | gauge | host, gpu |
| `gpu_memory_used_bytes`, `gpu_memory_total_bytes` | gauge | host, gpu |
| `gpu_temperature_celsius`, `gpu_power_watts` | gauge | host, gpu |
| `gpu_cached_bytes`, `gpu_cached_values` | gauge | host, gpu |
| `gpu_busy_seconds_total` | counter | host, gpu |
| `event_observer_errors_total` | counter | |

After `freeze()` (the job is over) every scrape and `render()` sees the pool as it was then
(its hosts as they were when the pool closed, not `closed`: a textfile left for the collector
would otherwise say every host was down after every job):
a short job's last counts stay readable for as long as the server is kept (`batuta run
--metrics-linger`), and `write_textfile` writes them where node-exporter's textfile collector
reads, replacing the file in one rename so that the collector never reads half of it.

A GPU reading that is unknown (NVML could not say) is left out, not reported as 0; a host
that goes down takes its CPU and GPU gauges with it. `gpu_busy_seconds_total` integrates
utilization over time: each heartbeat's utilization (NVML's "busy share of the last sample
period") times the seconds since the previous heartbeat of that GPU, skipping gaps over
`MAX_BUSY_GAP_S` (a host that was silent that long tells us nothing about the gap).
`gpu_cached_bytes` and `gpu_cached_values` are what the host's GPU slots keep on that card
between tasks (their device caches, uploaded once), always known: 0 where nothing is kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batuta.core.task import TaskStatus
from batuta.observers.atomic import replace_file
from batuta.runtime import events as pe

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from batuta.runtime.pool import Pool
    from batuta.runtime.views import HostView, PoolStats, SlotView

log = logging.getLogger("batuta.observers.metrics")

NAMESPACE = "batuta"
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
"""Seconds, 100 us to an hour (then +Inf): noop tasks and hour-long kernels in one histogram."""

SNAPSHOT_TIMEOUT_S = 2.0
MAX_BUSY_GAP_S = 30.0
SLOT_STATES = ("up", "draining", "lost", "retired")
HOST_STATES = (
    "starting",
    "up",
    "suspected",
    "lost",  # up once, away now: waiting for its relaunch or being relaunched (core/liveness.py `said`)
    "retired",
    "unreachable",
    "draining",
    "drained",
    "unfit",
    "closed",
)
# draining, drained (`Pool.drain`) and unfit: its agent is up, it gets no new work
_HOST_UP_STATES = frozenset({"up", "draining", "drained", "unfit"})
_RAN_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT})
_NONE = "none"  # label value where a task has no host or backend (it never ran)


@dataclass(slots=True)
class _GpuState:
    name: str
    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    temperature: float | None = None
    power: float | None = None
    cached_bytes: int = 0  # the GPU slots' device caches on this GPU
    cached_values: int = 0


@dataclass(frozen=True, slots=True)
class _HostReading:
    cpu_percent: float
    memory_used: int
    memory_total: int
    objects: int = 0
    object_bytes: int = 0
    spilled_bytes: int = 0


@dataclass(slots=True)
class _Snapshot:
    """Everything a scrape reads, copied on the event loop."""

    stats: PoolStats | None = None
    slots: list[SlotView] = field(default_factory=list)
    hosts: list[HostView] = field(default_factory=list)
    observer_errors: int = 0
    host_readings: dict[str, _HostReading] = field(default_factory=dict)
    gpus: dict[tuple[str, str], _GpuState] = field(default_factory=dict)
    gpu_busy: dict[tuple[str, str], float] = field(default_factory=dict)


class _NoCreated(Collector):
    """prometheus_client's counters and histograms as they are, less their `<name>_created`
    series. Its own switch (`disable_created_metrics()`, PROMETHEUS_DISABLE_CREATED_SERIES) is
    one for the whole process: it would turn them off in the user's own metrics too."""

    def __init__(self, *metrics: Counter | Histogram) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:  # the names the registry checks for clashes
        for metric in self._metrics:
            yield from metric.describe()

    def collect(self) -> Iterable[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                created = f"{family.name}_created"
                family.samples = [s for s in family.samples if s.name != created]
                yield family


class MetricsExporter:
    """Prometheus metrics for one pool, in a registry of its own. See the module docstring."""

    def __init__(self, pool: Pool, *, registry: CollectorRegistry | None = None) -> None:
        self.pool = pool
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tasks = Counter(
            "tasks",
            "Tasks that ended, by outcome (TaskStatus), kernel, backend and the host that ran them.",
            ("outcome", "kernel", "backend", "host"),
            namespace=NAMESPACE,
            registry=None,  # registered through _NoCreated, below
        )
        self._duration = Histogram(
            "task_duration_seconds",
            "Run time of tasks that ran (succeeded, failed or timed out), measured on the host.",
            ("kernel", "backend"),
            namespace=NAMESPACE,
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self._queue_wait = Histogram(
            "task_queue_wait_seconds",
            "Time from submission until a task started on a slot, for tasks that started.",
            ("backend",),
            namespace=NAMESPACE,
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.registry.register(_NoCreated(self._tasks, self._duration, self._queue_wait))
        self.registry.register(_PoolCollector(self))
        self._task_children: dict[tuple[str, str, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._wait_children: dict[str, Any] = {}
        self._kernels = pe.KernelNames()
        # Telemetry, written on the loop only; scrapes see copies.
        self._host_readings: dict[str, _HostReading] = {}
        self._gpus: dict[tuple[str, str], _GpuState] = {}
        self._gpu_at: dict[tuple[str, str], float] = {}
        self._gpu_busy: dict[tuple[str, str], float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = _Snapshot()
        self._unsubscribe: Callable[[], None] | None = None
        self._server: WSGIServer | None = None
        self.address: tuple[str, int] | None = None  # (address, port) once serving
        self._thread: threading.Thread | None = None
        self._frozen = False  # after freeze(): scrapes read the final snapshot, never the pool
        self._host_states: dict[str, str] = {}  # each host's last state before its pool closed

    # -- lifecycle ----------------------------------------------------------------------------

    def attach(self) -> MetricsExporter:
        """Subscribe to the pool's events (call on the pool's event loop). Idempotent."""
        if self._unsubscribe is None:
            self._capture_loop()
            self._unsubscribe = self.pool.subscribe(self.on_event)
        return self

    def serve(self, port: int, bind: str = "127.0.0.1") -> tuple[str, int]:
        """Serve `/metrics` over HTTP from a daemon thread; returns the bound (address, port).

        Port 0 picks a free port. Bound to loopback unless `bind` says otherwise: metrics
        name hosts and kernels, which is nobody else's business by default.
        """
        if self._server is not None:
            raise RuntimeError("this exporter is already serving; close() it first")
        self._capture_loop()
        server, thread = start_http_server(port, addr=bind, registry=self.registry)
        self._server, self._thread = server, thread
        address = server.server_address
        log.info("serving metrics on http://%s:%d/metrics", address[0], address[1])
        self.address = (str(address[0]), int(address[1]))
        return self.address

    def close(self) -> None:
        """Unsubscribe and stop the HTTP server (releasing its port). Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.address = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    @property
    def url(self) -> str | None:
        """Where a scrape goes (`http://address:port/metrics`), while serving."""
        return None if self.address is None else metrics_url(self.address)

    def freeze(self) -> None:
        """Stop following the pool and keep the numbers it has now, for later scrapes.

        Call on the pool's loop once the job is over (after the pool closed, so that tasks
        cancelled by the close are counted too). Idempotent.
        """
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if not self._frozen:
            self._take_snapshot()
            self._frozen = True

    def render(self) -> bytes:
        """The exposition text a scrape would get now."""
        return generate_latest(self.registry)

    def write_textfile(self, path: str | os.PathLike[str]) -> None:
        """Write `render()` to `path` atomically: into a temporary file in the same folder,
        synced, then renamed over `path`. Raises OSError (the temporary file is removed)."""
        target = Path(path)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # no .prom: the collector skips it
        replace_file(target, partial, [self.render()])

    def _capture_loop(self) -> None:
        if self._loop is None:
            with contextlib.suppress(RuntimeError):  # not on a loop: the first event will tell
                self._loop = asyncio.get_running_loop()

    # -- events (on the loop: cheap) ------------------------------------------------------

    def on_event(self, event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskFinished):
            self._task_finished(event)
        elif isinstance(event, pe.HostTelemetry):
            self._telemetry(event)
        elif isinstance(event, pe.HostUp):
            self._host_states[event.host] = "up"
        elif isinstance(event, pe.HostDown):
            self._host_states[event.host] = "lost"
            self._forget_host(event.host)
        elif isinstance(event, pe.HostStateChanged):
            if event.state != "closed":
                self._host_states[event.host] = event.state
            if event.state in pe.HOST_GONE_STATES:
                self._forget_host(event.host)

    def _task_finished(self, event: pe.TaskFinished) -> None:
        if self._loop is None:
            self._capture_loop()
        r = event.result
        kernel = self._kernels.key(r.name)
        backend = r.backend.value if r.backend is not None else _NONE
        key = (r.status.value, kernel, backend, r.host or _NONE)
        child = self._task_children.get(key)
        if child is None:
            child = self._task_children[key] = self._tasks.labels(*key)
        child.inc()
        if r.status in _RAN_STATUSES:
            dkey = (kernel, backend)
            hist = self._duration_children.get(dkey)
            if hist is None:
                hist = self._duration_children[dkey] = self._duration.labels(*dkey)
            hist.observe(r.duration)
        if r.slot is not None:
            wait = self._wait_children.get(backend)
            if wait is None:
                wait = self._wait_children[backend] = self._queue_wait.labels(backend)
            wait.observe(r.queue_wait)

    def _telemetry(self, event: pe.HostTelemetry) -> None:
        host = event.host
        self._host_readings[host] = _HostReading(
            event.cpu_percent,
            event.memory_used,
            event.memory_total,
            event.objects,
            event.object_bytes,
            event.spilled_bytes,
        )
        for g in event.gpus:
            key = (host, str(g.index))
            self._gpus[key] = _GpuState(
                name=g.name,
                utilization=g.utilization,
                memory_used=g.memory_used,
                memory_total=g.memory_total,
                temperature=g.temperature,
                power=g.power,
                cached_bytes=g.cached_bytes,
                cached_values=g.cached_values,
            )
            busy = self._gpu_busy.setdefault(key, 0.0)
            previous = self._gpu_at.get(key)
            if previous is not None and g.utilization is not None and 0.0 < event.at - previous <= MAX_BUSY_GAP_S:
                self._gpu_busy[key] = busy + (event.at - previous) * g.utilization / 100.0
            self._gpu_at[key] = event.at

    def _forget_host(self, host: str) -> None:
        self._host_readings.pop(host, None)
        for key in [k for k in self._gpus if k[0] == host]:
            del self._gpus[key]
            self._gpu_at.pop(key, None)  # the next reading after the gap starts a new interval

    # -- snapshots (scrape time) ------------------------------------------------------------

    def _take_snapshot(self) -> _Snapshot:
        """Copy what a scrape needs. Runs on the event loop."""
        pool = self.pool
        hosts = [
            replace(view, state=self._host_states.get(view.name, view.state)) if view.state == "closed" else view
            for view in pool.hosts()
        ]
        snapshot = _Snapshot(
            stats=pool.stats(),
            slots=pool.slots(),
            hosts=hosts,
            observer_errors=pool.events.errors,
            host_readings=dict(self._host_readings),
            gpus=dict(self._gpus),
            gpu_busy=dict(self._gpu_busy),
        )
        self._last = snapshot
        return snapshot

    def _snapshot(self) -> _Snapshot:
        """A fresh snapshot from the loop if it answers in time, else the previous one."""
        if self._frozen:
            return self._last
        loop = self._loop
        if loop is None:
            try:
                return self._take_snapshot()  # a pool that never started: nothing runs concurrently
            except RuntimeError:
                return self._last
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return self._take_snapshot()
        if loop.is_closed() or not loop.is_running():
            return self._last
        done: concurrent.futures.Future[_Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(self._take_snapshot())
            except BaseException as exc:  # hand it to the scrape thread
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return done.result(timeout=SNAPSHOT_TIMEOUT_S)
        except RuntimeError:  # the loop closed meanwhile
            return self._last
        except concurrent.futures.TimeoutError:
            log.warning(
                "metrics scrape: the event loop did not answer in %.1fs; serving the last snapshot", SNAPSHOT_TIMEOUT_S
            )
            return self._last


class _PoolCollector(Collector):
    """Metric families read from a snapshot of the pool at scrape time."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def describe(self) -> Iterable[Metric]:
        return ()  # families vary with the pool; nothing to pre-check

    def collect(self) -> Iterable[Metric]:
        s = self._exporter._snapshot()
        yield from _pool_families(s)
        yield from _host_families(s)
        yield from _gpu_families(s)


def metrics_url(address: tuple[str, int]) -> str:
    """`http://address:port/metrics`, an IPv6 address in brackets."""
    host, port = address
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


def _name(short: str) -> str:
    return f"{NAMESPACE}_{short}"


def _pool_families(s: _Snapshot) -> Iterable[Metric]:
    stats = s.stats
    if stats is not None:
        for short, doc, value in (
            ("tasks_submitted", "Tasks submitted to the pool.", stats.submitted),
            ("steals", "Deque-to-deque steals by idle slots.", stats.steals),
            ("steal_backs", "Tasks taken back from a slot's in-flight window (agent-confirmed).", stats.steal_backs),
            ("task_retries", "Started task attempts run again after their worker or host was lost.", stats.retries),
            (
                "task_requeues",
                "Tasks sent back to the queue (the dashboard's REQUEUED): retries, and tasks whose host went "
                "before they started.",
                stats.requeues,
            ),
            ("dropped_results", "Late or duplicate results dropped (each task resolves once).", stats.dropped_results),
            ("tasks_fed_ahead", "Tasks sent behind the tasks making their kept inputs.", stats.fed_ahead),
            ("object_relayed_bytes", "Kept values moved to another host through the coordinator.", stats.relayed_bytes),
            ("object_fetched_bytes", "Kept values fetched to the coordinator with pool.get.", stats.fetched_bytes),
        ):
            yield CounterMetricFamily(_name(short), doc, value=value)
        yield GaugeMetricFamily(_name("queue_depth"), "Tasks queued, not yet sent to a host.", value=stats.queued)
        yield GaugeMetricFamily(
            _name("tasks_waiting"), "Tasks waiting for upstream tasks or kept values.", value=stats.waiting
        )
        yield GaugeMetricFamily(
            _name("tasks_in_flight"), "Tasks sent to a slot and not yet finished.", value=stats.in_flight
        )
    depth = GaugeMetricFamily(_name("slot_queue_depth"), "Tasks in a slot's deque.", labels=("host", "slot"))
    in_flight = GaugeMetricFamily(
        _name("slot_in_flight"), "Tasks in a slot's in-flight window.", labels=("host", "slot")
    )
    by_state = dict.fromkeys(SLOT_STATES, 0)
    for view in s.slots:
        depth.add_metric((view.host_id, view.slot_id), view.deque_depth)
        in_flight.add_metric((view.host_id, view.slot_id), view.in_flight)
        by_state[view.state] = by_state.get(view.state, 0) + 1
    slots = GaugeMetricFamily(_name("slots"), "Worker slots by state.", labels=("state",))
    for state, count in by_state.items():
        slots.add_metric((state,), count)
    yield depth
    yield in_flight
    yield slots
    yield CounterMetricFamily(
        _name("event_observer_errors"), "Exceptions raised by event subscribers (isolated).", value=s.observer_errors
    )


def _host_families(s: _Snapshot) -> Iterable[Metric]:
    up = GaugeMetricFamily(
        _name("host_up"), "1 if the host's agent is up (or draining, or unfit), else 0.", labels=("host",)
    )
    state = GaugeMetricFamily(_name("host_state"), "1 for the host's current state.", labels=("host", "state"))
    for view in s.hosts:
        up.add_metric((view.name,), 1.0 if view.state in _HOST_UP_STATES else 0.0)
        states = HOST_STATES if view.state in HOST_STATES else (*HOST_STATES, view.state)
        for name in states:
            state.add_metric((view.name, name), 1.0 if name == view.state else 0.0)
    yield up
    yield state
    cpu = GaugeMetricFamily(_name("host_cpu_utilization_ratio"), "Host CPU utilization, 0 to 1.", labels=("host",))
    used = GaugeMetricFamily(_name("host_memory_used_bytes"), "Host memory in use.", labels=("host",))
    total = GaugeMetricFamily(_name("host_memory_total_bytes"), "Host memory installed.", labels=("host",))
    objects = GaugeMetricFamily(_name("host_objects"), "Objects in the host agent's store.", labels=("host",))
    object_bytes = GaugeMetricFamily(_name("host_object_bytes"), "Bytes of those objects.", labels=("host",))
    spilled = GaugeMetricFamily(
        _name("host_object_spilled_bytes"), "Of those bytes, on the host's disk (past its cap).", labels=("host",)
    )
    for host, reading in s.host_readings.items():
        cpu.add_metric((host,), reading.cpu_percent / 100.0)
        used.add_metric((host,), reading.memory_used)
        total.add_metric((host,), reading.memory_total)
        objects.add_metric((host,), reading.objects)
        object_bytes.add_metric((host,), reading.object_bytes)
        spilled.add_metric((host,), reading.spilled_bytes)
    yield cpu
    yield used
    yield total
    yield objects
    yield object_bytes
    yield spilled


def _gpu_families(s: _Snapshot) -> Iterable[Metric]:
    labels = ("host", "gpu")
    info = GaugeMetricFamily(_name("gpu_info"), "GPU names; always 1.", labels=("host", "gpu", "name"))
    families = {
        "utilization": GaugeMetricFamily(_name("gpu_utilization_ratio"), "GPU busy share, 0 to 1.", labels=labels),
        "memory_used": GaugeMetricFamily(_name("gpu_memory_used_bytes"), "GPU memory in use.", labels=labels),
        "memory_total": GaugeMetricFamily(_name("gpu_memory_total_bytes"), "GPU memory installed.", labels=labels),
        "temperature": GaugeMetricFamily(_name("gpu_temperature_celsius"), "GPU temperature.", labels=labels),
        "power": GaugeMetricFamily(_name("gpu_power_watts"), "GPU power draw.", labels=labels),
        "cached_bytes": GaugeMetricFamily(
            _name("gpu_cached_bytes"), "Bytes of values kept on the GPU by its slots' device caches.", labels=labels
        ),
        "cached_values": GaugeMetricFamily(
            _name("gpu_cached_values"), "Values kept on the GPU by its slots' device caches.", labels=labels
        ),
    }
    for key, gpu in s.gpus.items():
        info.add_metric((*key, gpu.name), 1.0)
        for attr, family in families.items():
            value = getattr(gpu, attr)
            if value is not None:  # unknown stays absent rather than pretending to be 0
                family.add_metric(key, value / 100.0 if attr == "utilization" else value)
    yield info
    yield from families.values()
    busy = CounterMetricFamily(
        _name("gpu_busy_seconds"),
        "GPU busy time: utilization integrated over time between heartbeats.",
        labels=labels,
    )
    for key, seconds in s.gpu_busy.items():
        busy.add_metric(key, seconds)
    yield busy
