"""What a served coordinator remembers for the viewers that attach later: bounded, compacted.

A dashboard attached an hour into a job must look as if it had been open from the start:
the same counts, throughput sparkline, latency histograms, failures, GPU history and log.
Keeping every event would grow without bound, so the history keeps the last
`RAW_TASK_ITEMS` task events verbatim (the task stream and the newest seconds are folded by
the viewer's own model, exactly as live events are) and compacts the older ones as they
fall off into what they add up to: per-job and per-host counters, per-second throughput for
the sparkline's minute, latency bucket counts per (kernel, backend, host) (the first
`KERNELS_KEPT` task names, then "other": batuta/runtime/events.py), the last
`FAILURES_KEPT` failures, and the tasks still running whose start fell off. Hosts keep their
last `HostUp`, last state change and a minute of telemetry; the log its last `LOGS_KEPT`
lines. Everything is held as wire items (batuta/runtime/serve_wire.py), so a snapshot is a
copy of lists, not an encoding pass over objects.

The latency buckets use the dashboard's histogram edges (batuta/tui/histogram.py: 1 µs up,
5 a decade, 45 buckets); tests/test_serve.py checks the two agree.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

from batuta.runtime import events as pe
from batuta.runtime import serve_wire as w

RAW_TASK_ITEMS = 3_000
FAILURES_KEPT = 200
LOGS_KEPT = 1_000
TELEMETRY_KEPT = 64  # a minute of heartbeats per host: the GPU sparkline's history
THROUGHPUT_KEPT_S = 62  # the throughput sparkline's minute, and a little
JOB_METER_KEPT_S = 14  # the jobs panel's rate window, twice, and a little

LOW_S = 1e-6
BUCKETS_PER_DECADE = 5
BUCKET_COUNT = 45
_LOG_LOW = math.log10(LOW_S)
_RAN = frozenset({"succeeded", "failed", "timed_out"})
_NOT_FAILED = frozenset({"succeeded", "cancelled"})


def bucket_of(seconds: float) -> int:
    """The latency bucket of a duration, as batuta.tui.histogram.bucket_of computes it."""
    if seconds <= LOW_S:
        return 0
    index = int((math.log10(seconds) - _LOG_LOW) * BUCKETS_PER_DECADE)
    return index if index < BUCKET_COUNT else BUCKET_COUNT - 1


class Buckets:
    """Counts and sums per latency bucket, with the total, the sum and the maximum."""

    __slots__ = ("counts", "max_s", "sum_s", "sums", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKET_COUNT
        self.sums = [0.0] * BUCKET_COUNT
        self.total = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        index = bucket_of(seconds)
        self.counts[index] += 1
        self.total += 1
        if seconds > 0:
            self.sums[index] += seconds
            self.sum_s += seconds
            self.max_s = max(self.max_s, seconds)

    def to_wire(self) -> list[Any]:
        spread = [[i, c, self.sums[i]] for i, c in enumerate(self.counts) if c]
        return [spread, self.total, self.sum_s, self.max_s]


class _JobTotals:
    """What a job's compacted events add up to."""

    __slots__ = ("cancelled", "failed", "meter", "requeued", "started_at", "submitted", "succeeded")

    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = self.requeued = 0
        self.started_at: float | None = None
        self.meter: dict[int, int] = {}


def _count_second(meter: dict[int, int], at: float, kept_s: int) -> None:
    second = int(at)
    meter[second] = meter.get(second, 0) + 1
    if len(meter) > kept_s:
        del meter[min(meter)]


class ViewerHistory:
    """The coordinator's bounded memory of what viewers need; fed wire items with `record`."""

    def __init__(self) -> None:
        self.raw: deque[list[Any]] = deque()
        self.running: dict[int, list[Any]] = {}  # task id -> its STARTED item, while it runs
        self.running_compacted: dict[int, list[Any]] = {}  # those whose STARTED fell off `raw`
        self.host_up: dict[str, list[Any]] = {}
        self.host_state: dict[str, list[Any]] = {}
        self.telemetry: dict[str, deque[list[Any]]] = {}
        self.slot_state: dict[str, list[Any]] = {}
        self.logs: deque[list[Any]] = deque(maxlen=LOGS_KEPT)
        self.jobs: dict[str, list[Any]] = {}  # job name -> its latest JOB item
        self.status: list[Any] = [w.STATUS, "starting", ""]
        self.paused: list[Any] = [w.PAUSED, False]
        self.slots: list[Any] | None = None
        self.job_totals: dict[str, _JobTotals] = {}
        self.host_counts: dict[str, list[int]] = {}  # host -> [done, failed] of compacted tasks
        self.throughput: dict[int, int] = {}
        self.latency: dict[tuple[str, str, str], tuple[Buckets, Buckets]] = {}
        self._kernels = pe.KernelNames()  # the first names key their own histograms, the rest share one
        self.failures: OrderedDict[int, list[Any]] = OrderedDict()
        # whole-run totals for `batuta ps` (never compacted away)
        self.submitted = self.finished = self.failed = 0

    # -- feeding ----------------------------------------------------------------------------

    def record(self, items: list[list[Any]]) -> None:
        """Remember a flushed batch of wire items (in order)."""
        raw = self.raw
        running = self.running
        for item in items:
            kind = item[0]
            if kind == w.FINISHED:
                self.finished += 1
                if item[3] not in _NOT_FAILED:
                    self.failed += 1
                running.pop(item[1], None)
                if self.running_compacted:
                    self.running_compacted.pop(item[1], None)
            elif kind == w.QUEUED:
                self.submitted += 1
            elif kind == w.STARTED:
                running[item[1]] = item
            elif kind == w.REQUEUED:
                running.pop(item[1], None)
                if self.running_compacted:
                    self.running_compacted.pop(item[1], None)
            else:
                self._note(kind, item)
                continue
            if len(raw) >= RAW_TASK_ITEMS:
                self._compact(raw.popleft())
            raw.append(item)

    def _note(self, kind: int, item: list[Any]) -> None:
        if kind == w.TELEMETRY:
            beats = self.telemetry.get(item[1])
            if beats is None:
                beats = self.telemetry[item[1]] = deque(maxlen=TELEMETRY_KEPT)
            beats.append(item)
        elif kind == w.LOG:
            self.logs.append(item)
        elif kind == w.SLOTS:
            self.slots = item
        elif kind == w.HOST_UP:
            self.host_up[item[1]] = item
            self.host_state.pop(item[1], None)
        elif kind in (w.HOST_STATE, w.HOST_DOWN):
            self.host_state[item[1]] = item
        elif kind == w.SLOT_STATE:
            self.slot_state[item[2]] = item
        elif kind == w.JOB:
            self.jobs[item[1]] = item
        elif kind == w.STATUS:
            self.status = item
        elif kind == w.PAUSED:
            self.paused = item

    def _job(self, name: str) -> _JobTotals:
        totals = self.job_totals.get(name)
        if totals is None:
            totals = self.job_totals[name] = _JobTotals()
        return totals

    def _compact(self, item: list[Any]) -> None:
        """Fold a task event that falls off `raw` into what it adds up to."""
        kind = item[0]
        if kind == w.FINISHED:
            (_, task_id, name, status, _error, duration, queue_wait, host, slot, _tries, backend, job, _err, at) = item
            totals = self._job(job)
            if status == "succeeded":
                totals.succeeded += 1
            elif status == "cancelled":
                totals.cancelled += 1
            else:
                totals.failed += 1
                self.failures[task_id] = item
                self.failures.move_to_end(task_id)
                if len(self.failures) > FAILURES_KEPT:
                    self.failures.popitem(last=False)
            if host is not None and status != "cancelled":
                counts = self.host_counts.get(host)
                if counts is None:
                    counts = self.host_counts[host] = [0, 0]
                counts[0] += 1
                if status != "succeeded":
                    counts[1] += 1
            _count_second(self.throughput, at, THROUGHPUT_KEPT_S)
            _count_second(totals.meter, at, JOB_METER_KEPT_S)
            if slot is not None and status in _RAN:
                key = (self._kernels.key(name), backend or "?", host or "?")
                pair = self.latency.get(key)
                if pair is None:
                    pair = self.latency[key] = (Buckets(), Buckets())
                pair[0].add(queue_wait)
                pair[1].add(duration)
        elif kind == w.QUEUED:
            totals = self._job(item[6])
            totals.submitted += 1
            if totals.started_at is None:
                totals.started_at = item[4]
        elif kind == w.STARTED:
            if self.running.get(item[1]) is item:
                self.running_compacted[item[1]] = item
        elif kind == w.REQUEUED:
            self._job(item[7]).requeued += 1

    # -- reading ----------------------------------------------------------------------------

    def hosts_up(self) -> list[str]:
        """The hosts that came up and are not gone since (lost, retired, or closed with the pool)."""
        up = []
        for host in self.host_up:
            state = self.host_state.get(host)
            if state is None or (state[0] == w.HOST_STATE and state[2] not in pe.HOST_GONE_STATES):
                up.append(host)
        return up

    def snapshot(self, *, dropped: int = 0) -> dict[str, Any]:
        """Everything a viewer's model is rebuilt from (see batuta/tui/attach.py's `restore`)."""
        hosts: list[list[Any]] = list(self.host_up.values())
        hosts += self.host_state.values()
        for beats in self.telemetry.values():
            hosts += beats
        return {
            "status": self.status,
            "paused": self.paused,
            "hosts": hosts,
            "slot_states": list(self.slot_state.values()),
            "jobs": list(self.jobs.values()),
            "job_totals": [
                [
                    name,
                    t.submitted,
                    t.succeeded,
                    t.failed,
                    t.cancelled,
                    t.requeued,
                    t.started_at,
                    sorted(t.meter.items()),
                ]
                for name, t in self.job_totals.items()
            ],
            "host_counts": [[host, done, failed] for host, (done, failed) in self.host_counts.items()],
            "throughput": [[s, c] for s, c in sorted(self.throughput.items())],
            "latency": [[*key, queue.to_wire(), run.to_wire()] for key, (queue, run) in self.latency.items()],
            "failures": list(self.failures.values()),
            "running": list(self.running_compacted.values()),
            "events": list(self.raw),
            "logs": list(self.logs),
            "slots": self.slots,
            "dropped": dropped,
        }
