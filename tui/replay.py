"""A seeded, synthetic cluster that emits the runtime's public events: no agents, no clock.

The load benchmark needs 64 hosts and 5,000 task events a second, the snapshot tests need
the same screen on every run, and the screenshots need a big cluster on a small machine.
None of that should start real agents, so this module produces what a pool would publish
(`HostUp`, `HostTelemetry`, `TaskQueued`, `TaskStarted`, `TaskFinished`, `TaskRequeued`)
from `random.Random(seed)` and the instants the caller passes in, plus the `SlotView`s that
`Pool.slots()` would give. It never reads a clock: the same seed and the same instants give
the same events, byte for byte.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from batuta.runtime import events as pe
from batuta.runtime.views import Backend, SlotView, TaskResult, TaskStatus

KERNELS = (("spin", "cpu"), ("vadd", "gpu"), ("saxpy", "gpu"), ("mc_pi", "cpu"), ("kmeans_step", "gpu"))
JOBS = ("kmeans", "demo", "pi")
_BROADCAST = "ValueError: operands could not be broadcast together with shapes (1024,) (1000,)"
FAILURES = {  # kernel -> (error, stderr) of its simulated failures
    "spin": ("TimeoutError: spin ran past its 2 s budget", b"worker: spin(2.5) cancelled at 2.0 s\n"),
    "vadd": (
        _BROADCAST,
        f'Traceback (most recent call last):\n  File "kernels/basic.py", line 88, in vadd\n{_BROADCAST}\n'.encode(),
    ),
    "saxpy": (
        _BROADCAST,
        f'Traceback (most recent call last):\n  File "kernels/basic.py", line 97, in saxpy\n{_BROADCAST}\n'.encode(),
    ),
    "mc_pi": ("MemoryError: cannot allocate 8.0 GiB for 1e9 samples", b"numba: allocation failed in mc_pi\n"),
    "kmeans_step": ("FloatingPointError: empty cluster 3 (no points assigned)", b"kmeans_step: centroid 3 is NaN\n"),
}
GIB = 2**30
_CAPABILITIES = {kind: frozenset({kind}) for kind in ("cpu", "gpu")}


def _gpu_capabilities(index: int) -> frozenset[str]:
    return frozenset({"gpu", f"gpu:{index}"})  # as a pool's GPU slot offers them


@dataclass(slots=True)
class _SimulatedSlot:
    slot_id: str
    host: str
    kind: str
    gpu_index: int | None = None
    busy_until: float = 0.0
    completed: int = 0
    run_total: float = 0.0
    steals_in: int = 0
    steals_out: int = 0


def _busy_until(slot: _SimulatedSlot) -> float:
    return slot.busy_until


@dataclass(slots=True)
class SyntheticCluster:
    """`hosts` hosts with `slots_per_host` CPU slots and `gpus_per_host` GPUs (and GPU slots).

    Every eighth host has no GPU (its telemetry says "no NVIDIA driver"); host 1's GPU 0
    cannot read its power (NVML "not supported"); host 2 runs hot and nearly full, so the
    alerts have something to say. `task_events(start, end, rate)` emits task lifecycles
    whose events fall in [start, end) at about `rate` events a second.
    """

    hosts: int = 4
    slots_per_host: int = 2
    gpus_per_host: int = 2
    seed: int = 0
    failure_rate: float = 0.01
    requeue_rate: float = 0.005
    rng: random.Random = field(init=False)
    _slots: list[_SimulatedSlot] = field(init=False)
    _by_kind: dict[str, list[_SimulatedSlot]] = field(init=False)
    _heap: list[tuple[float, int, object]] = field(init=False)
    _order: itertools.count[int] = field(init=False)
    _ids: itertools.count[int] = field(init=False)
    _next_submit: float | None = field(init=False, default=None)
    _telemetry_seq: int = field(init=False, default=0)
    _idle_views: dict[str, SlotView] = field(init=False, default_factory=dict)
    _host_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._heap = []
        self._order = itertools.count()
        self._ids = itertools.count(1)
        self._slots = []
        self._host_names = self._names()
        for host in self._host_names:
            for index in range(self.slots_per_host):
                self._slots.append(_SimulatedSlot(f"{host}/{index}", host, "cpu"))
            for gpu in range(self._gpu_count(host)):
                self._slots.append(_SimulatedSlot(f"{host}/{self.slots_per_host + gpu}", host, "gpu", gpu))
        self._by_kind = {kind: [s for s in self._slots if s.kind == kind] for kind in ("cpu", "gpu")}

    # -- hosts ------------------------------------------------------------------------------

    def host_names(self) -> list[str]:
        return list(self._host_names)

    def _names(self) -> list[str]:
        width = max(2, len(str(self.hosts)))
        return [f"node{index:0{width}d}" for index in range(1, self.hosts + 1)]

    def _gpu_count(self, host: str) -> int:
        index = int(host.removeprefix("node"))
        return 0 if index % 8 == 0 else self.gpus_per_host

    def host_up_events(self, at: float) -> list[pe.HostUp]:
        return [
            pe.HostUp(
                host=host,
                slots=tuple(s.slot_id for s in self._slots if s.host == host),
                gpus=tuple(f"Sim H100 {g}" for g in range(self._gpu_count(host))),
                cpu_count=self.slots_per_host * 8,
                batuta_version="sim",
                python_version="3.11",
                at=at,
            )
            for host in self.host_names()
        ]

    def telemetry_events(self, at: float) -> list[pe.HostTelemetry]:
        """One heartbeat's telemetry for every host (call about once a second).

        One generator per beat, seeded by the beat's number, draws for every host and GPU in
        order: the beat is the same whenever it is replayed, and seeding costs once per
        beat, not once per host and GPU (1,400 Mersenne Twister seedings a beat at 256 hosts
        were most of the load benchmark's feeder).
        """
        seq = self._telemetry_seq
        self._telemetry_seq += 1
        rng = random.Random(f"batuta-sim-beat:{self.seed}:{seq}")
        out = []
        for number, host in enumerate(self._host_names, start=1):
            cpu_percent = round(rng.uniform(20, 95), 1)
            memory_used = int(256 * GIB * rng.uniform(0.2, 0.7))
            gpus = tuple(self._gpu_reading(rng, number, g, seq) for g in range(self._gpu_count(host)))
            out.append(
                pe.HostTelemetry(
                    host=host,
                    cpu_percent=cpu_percent,
                    memory_used=memory_used,
                    memory_total=256 * GIB,
                    gpus=gpus,
                    gpu_status="" if gpus else "no NVIDIA driver",
                    at=at,
                )
            )
        return out

    def _gpu_reading(self, rng: random.Random, host_number: int, index: int, seq: int) -> pe.GpuReading:
        phase = (seq / 9.0) + host_number * 0.7 + index * 1.3
        utilization = max(0.0, min(100.0, 60 + 35 * math.sin(phase) + rng.uniform(-8, 8)))
        memory_fraction = rng.uniform(0.3, 0.8)
        temperature = 40 + utilization * 0.35 + rng.uniform(0, 4)
        if host_number == 2:  # the troubled one: hot and nearly out of memory
            memory_fraction, temperature = 0.95, 88.0 + rng.uniform(0, 2)
        # Even GPUs' device caches fill up, to a size that differs by host; odd ones keep nothing.
        resident = 0 if index % 2 else min(6 + 3 * (host_number % 4), 1 + seq // 2)
        return pe.GpuReading(
            index=index,
            name=f"Sim H100 {index}",
            utilization=round(utilization, 1),
            memory_used=int(80 * GIB * memory_fraction),
            memory_total=80 * GIB,
            temperature=round(temperature, 1),
            power=None if (host_number == 1 and index == 0) else round(90 + utilization * 5.5, 1),
            cached_values=resident,
            cached_bytes=resident * (3 * GIB // 2),
            cache_cap=40 * GIB,
        )

    def slot_views(self, now: float) -> list[SlotView]:
        """Slot views as `Pool.slots()` would give them at `now`.

        A busy slot's deque and window are drawn from one generator per half second (the
        same `now` gives the same views); an idle slot's view is the one it had while its
        counters did not move, so a poll builds views only for what changed.
        """
        rng = random.Random(f"batuta-sim-slots:{self.seed}:{int(now * 2)}")
        idle = self._idle_views
        views = []
        for slot in self._slots:
            if slot.busy_until > now:
                views.append(self._slot_view(slot, rng.randrange(0, 6), 1 + rng.randrange(0, 3)))
                continue
            view = idle.get(slot.slot_id)
            if view is None or (view.completed, view.steals_in, view.steals_out) != (
                slot.completed,
                slot.steals_in,
                slot.steals_out,
            ):
                view = idle[slot.slot_id] = self._slot_view(slot, 0, 0)
            views.append(view)
        return views

    @staticmethod
    def _slot_view(slot: _SimulatedSlot, deque_depth: int, in_flight: int) -> SlotView:
        return SlotView(
            slot_id=slot.slot_id,
            host_id=slot.host,
            capabilities=_CAPABILITIES[slot.kind] if slot.gpu_index is None else _gpu_capabilities(slot.gpu_index),
            state="up",
            deque_depth=deque_depth,
            in_flight=in_flight,
            window_limit=4,
            steals_in=slot.steals_in,
            steals_out=slot.steals_out,
            completed=slot.completed,
            mean_run_s=slot.run_total / slot.completed if slot.completed else None,
        )

    # -- tasks ------------------------------------------------------------------------------

    def task_events(self, start: float, end: float, rate: float) -> list[object]:
        """Events with `at` in [start, end), about `rate` a second (three per task)."""
        if self._next_submit is None:
            self._next_submit = start
        interval = 3.0 / rate if rate > 0 else math.inf
        while self._next_submit < end:
            self._submit(self._next_submit)
            self._next_submit += interval * self.rng.uniform(0.5, 1.5)
        out = []
        heap = self._heap
        while heap and heap[0][0] < end:
            _at, _order, event = heapq.heappop(heap)
            out.append(event)
        return out

    def _push(self, at: float, event: object) -> None:
        heapq.heappush(self._heap, (at, next(self._order), event))

    def _submit(self, at: float) -> None:
        rng = self.rng
        task_id = next(self._ids)
        kernel, kind = KERNELS[int(rng.random() * len(KERNELS))]
        candidates = self._by_kind.get(kind) or self._slots
        kind = candidates[0].kind
        job = JOBS[task_id % 7 % len(JOBS)] if task_id % 7 < 5 else JOBS[0]
        self._push(at, pe.TaskQueued(task_id=task_id, name=kernel, backend=kind, at=at, job=job))
        # the least busy of a few random slots: cheap, and close to what stealing achieves
        slot = min(rng.choices(candidates, k=3), key=_busy_until)
        started = max(at + rng.uniform(0.0002, 0.002), slot.busy_until)
        run_s = min(5.0, rng.lognormvariate(math.log(0.004 if kind == "cpu" else 0.0015), 0.9))
        attempt = 1
        if rng.random() < self.requeue_rate:  # its first host dies under it
            self._push(
                started,
                pe.TaskStarted(
                    task_id=task_id, name=kernel, host=slot.host, slot=slot.slot_id, attempt=1, at=started, job=job
                ),
            )
            lost_at = started + run_s / 2
            self._push(
                lost_at,
                pe.TaskRequeued(
                    task_id=task_id, name=kernel, slot=slot.slot_id, attempts=1, reason="host lost", at=lost_at, job=job
                ),
            )
            slot.busy_until = lost_at
            other = min(rng.choices(candidates, k=3), key=lambda s: s.busy_until + (1.0 if s is slot else 0.0))
            other.steals_in += 1
            slot.steals_out += 1
            slot, started, attempt = other, max(lost_at + 0.001, other.busy_until), 2
        finished = started + run_s
        slot.busy_until = finished
        slot.completed += 1
        slot.run_total += run_s
        failed = rng.random() < self.failure_rate
        error, stderr = FAILURES[kernel] if failed else (None, b"")
        self._push(
            started,
            pe.TaskStarted(
                task_id=task_id, name=kernel, host=slot.host, slot=slot.slot_id, attempt=attempt, at=started, job=job
            ),
        )
        result = TaskResult(
            task_id=task_id,
            name=kernel,
            status=TaskStatus.FAILED if failed else TaskStatus.SUCCEEDED,
            value=None,
            stderr=stderr,
            error=error,
            duration=run_s,
            queue_wait=started - at,
            host=slot.host,
            slot=slot.slot_id,
            attempts=attempt,
            backend=Backend(kind),
            backend_reason="simulated",
            job=job,
        )
        self._push(finished, pe.TaskFinished(result=result, at=finished))


def replay(
    model_apply: Callable[[object], object], cluster: SyntheticCluster, start: float, end: float, rate: float
) -> int:
    """Feed `cluster`'s hosts, a telemetry beat per second and tasks in [start, end) to a callback.

    Returns how many events were fed. `model_apply` is `DashboardModel.apply` or an
    `EventBus.publish`; events reach it in time order within each second.
    """
    apply = model_apply
    fed = 0
    for up in cluster.host_up_events(start):
        apply(up)
        fed += 1
    second = start
    while second < end:
        for beat in cluster.telemetry_events(second):
            apply(beat)
            fed += 1
        for event in cluster.task_events(second, min(second + 1.0, end), rate):
            apply(event)
            fed += 1
        second += 1.0
    return fed
