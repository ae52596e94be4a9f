"""`Pool`: the asyncio coordinator around the sans-I/O scheduler.

The pool is the thin shell of the dask worker-state-machine pattern: it turns what host
agents say into scheduler events, runs the scheduler's instructions (send, steal back,
abort, resolve), keeps each task's payload and future, watches liveness and relaunches
lost hosts, and publishes events for observers. Every placement decision is the core's.

    async with Pool.builder().cpu_workers(4).build() as pool:
        result = await pool.run(Task.kernel("vadd", a, b))
        values = await pool.map("mc_pi", [(1_000_000, seed) for seed in range(16)])
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from batuta.agent.options import MAX_SLOTS
from batuta.core import events as ev
from batuta.core.backend import BackendChoice, BackendThresholds, select_backend
from batuta.core.objects import ObjectRef, refs_in
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import (
    CAP_CPU,
    CAP_GPU,
    Backend,
    KernelCall,
    Priority,
    Task,
    TaskResult,
    TaskStatus,
)
from batuta.errors import AgentError, PoolClosedError, TaskFailedError, TransportError, UsageError
from batuta.protocol import messages as m
from batuta.protocol.codec import check_value
from batuta.protocol.errors import LocalProtocolError
from batuta.runtime import events as pe
from batuta.runtime import stream
from batuta.runtime.host import HostSession, HostSpec, HostState
from batuta.runtime.objects import ObjectTable
from batuta.runtime.views import HostView, PoolStats, SlotView
from batuta.transport.local import agent_command, open_local_agent

log = logging.getLogger("batuta.runtime.pool")

SUBMIT_BATCH = 1024  # most submissions held back for one scheduling pass

# The job label of tasks submitted from the current context (see `Pool.job`).
_current_job: ContextVar[str] = ContextVar("batuta_job", default="")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """Everything a pool needs besides its hosts. Built by `PoolBuilder`."""

    seed: int = 0
    heartbeat_interval: float = 1.0
    suspect_after: float = 3.0  # seconds of silence before a host is suspected
    lost_after: float = 8.0  # seconds of silence before it is lost and its work requeued
    max_relaunches: int = 5  # consecutive failed relaunches before a host is retired
    relaunch_backoff: float = 0.5  # first delay; doubles each time, capped at 30 s
    start_timeout: float = 60.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    thresholds: BackendThresholds = field(default_factory=BackendThresholds)


@functools.lru_cache(maxsize=1024)
def _superlinear(kernel_name: str) -> bool:
    """Whether the registry marks the kernel O(n^2) or worse (the seed's GPU rule)."""
    from batuta.kernels import registry

    try:
        return registry.info(kernel_name).complexity in ("quadratic", "cubic")
    except Exception:  # unknown here (a module only the hosts load): no GPU by guess
        return False


@functools.lru_cache(maxsize=256)
def _requirements(backend: Backend, tags: frozenset[str]) -> frozenset[str]:
    """The capabilities a task needs; interned, since most tasks share a handful of sets."""
    return frozenset({CAP_GPU if backend is Backend.GPU else CAP_CPU, *tags})


class ResultStore(Protocol):
    """Where finished results are kept across runs (a job journal, for `--resume`).

    `lookup` is asked at submission: a hit resolves the task at once without running it.
    `record` is told every succeeded result. Both run on the event loop: keep them quick
    and hand slow I/O to a thread.
    """

    def lookup(self, task: Task, job: str) -> TaskResult | None: ...

    def record(self, task: Task, job: str, result: TaskResult) -> None: ...


class TaskFuture:
    """A submitted task. `await` it for its `TaskResult`; `cancel()` cancels the task.

    It is also the pool's own record of the task while it is unresolved (where it was sent,
    when it started), and it creates an asyncio future only when someone waits: a million
    queued tasks then cost one small object each, not three.
    """

    __slots__ = (
        "_callbacks",
        "_choice",
        "_object_ids",
        "_pool",
        "_result",
        "_waiter",
        "job",
        "slot_id",
        "started_at",
        "submitted_at",
        "task",
        "task_id",
    )

    def __init__(self, pool: Pool, task_id: int, task: Task, choice: BackendChoice, job: str, now: float) -> None:
        self._pool = pool
        self.task_id = task_id
        self.task = task
        self._choice = choice
        self.job = job
        self.submitted_at = now
        self.slot_id: str | None = None
        self.started_at: float | None = None
        self._result: TaskResult | None = None
        self._waiter: asyncio.Future[TaskResult] | None = None
        self._callbacks: list[Callable[[TaskFuture], None]] | None = None
        self._object_ids: tuple[int, ...] = ()  # pool.put objects its arguments name

    def __await__(self) -> Generator[Any, None, TaskResult]:
        if self._result is None:
            # shielded: a caller that gives up waiting must not cancel the shared waiter
            yield from asyncio.shield(self.asyncio_future()).__await__()
        assert self._result is not None
        return self._result

    def asyncio_future(self) -> asyncio.Future[TaskResult]:
        """An asyncio future for the result (for `asyncio.gather`, `as_completed`, `wait`)."""
        if self._waiter is None:
            self._waiter = self._pool._new_future()
            if self._result is not None:
                self._waiter.set_result(self._result)
        return self._waiter

    def done(self) -> bool:
        return self._result is not None

    def result(self) -> TaskResult:
        """The result, if `done()`; raises asyncio.InvalidStateError otherwise."""
        if self._result is None:
            raise asyncio.InvalidStateError(f"task {self.task_id} ({self.task.name}) has not finished")
        return self._result

    def cancel(self) -> bool:
        """Ask for the task to be cancelled; it resolves with status CANCELLED unless already done."""
        if self._result is not None:
            return False
        self._pool.cancel(self.task_id)
        return True

    def add_done_callback(self, callback: Callable[[TaskFuture], None]) -> None:
        """Call `callback(self)` once done, from the event loop (never inside the pool's own work)."""
        if self._result is not None:
            self._pool._call_soon(callback, self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _resolve(self, result: TaskResult) -> None:
        if self._result is not None:
            return
        self._result = result
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(result)
        if self._callbacks:
            for callback in self._callbacks:
                self._pool._call_soon(callback, self)
            self._callbacks = None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<TaskFuture {self.task_id} {self.task.name} {state}>"


class Pool:
    """A work-stealing pool over host agents. Use as `async with`, or `start()` / `close()`."""

    def __init__(self, hosts: Sequence[HostSpec], config: PoolConfig | None = None) -> None:
        if not hosts:
            raise UsageError("a pool needs at least one host; use Pool.local() for this machine")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise UsageError(f"host names must be unique, got {names}")
        self.config = config or PoolConfig()
        self.events = pe.EventBus()
        self._specs = list(hosts)
        self._scheduler = Scheduler(self.config.scheduler, seed=self.config.seed)
        self._sessions: dict[str, HostSession] = {}
        self._slot_of: dict[str, tuple[HostSession, int]] = {}
        self._pending: dict[int, TaskFuture] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._space = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._relaunches: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._closed = False
        self._succeeded = 0
        self._failed = 0
        self._gpu_available = False
        self._outcomes: dict[int, tuple[m.TaskOutcome, str]] = {}  # the batch being handled
        self._store: ResultStore | None = None
        self._device_of: dict[str, str] = {}  # GPU slot id -> "name (N SMs)"
        self._restored = 0
        self._objects = ObjectTable()
        # Submissions of one loop turn reach the scheduler together (see `_handle`): one
        # scheduling pass and one Run per slot for a burst, instead of one each per task.
        self._submitted: list[ev.Event] = []

    # -- construction -----------------------------------------------------------------------

    @staticmethod
    def builder() -> PoolBuilder:
        """The seed's builder: `Pool.builder().cpu_workers(n).build()`."""
        return PoolBuilder()

    @classmethod
    def local(cls, cpu_workers: int | None = None, *, gpu_workers: str = "auto", seed: int = 0, **options: Any) -> Pool:
        """A pool on this machine only: one local agent with `cpu_workers` slots (default: cores)."""
        builder = cls.builder().cpu_workers(cpu_workers).gpu_workers(gpu_workers).seed(seed)
        for key, value in options.items():
            getattr(builder, key)(value)
        return builder.build()

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Launch every host concurrently and wait for their handshakes.

        Hosts that fail to start are retried in the background; the pool starts if at least
        one host is up, and raises the first error if none is.
        """
        if self._started:
            raise UsageError("pool already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        sessions = [
            HostSession(
                spec=spec,
                listener=self,
                heartbeat_interval=self.config.heartbeat_interval,
                handshake_timeout=self.config.start_timeout,
            )
            for spec in self._specs
        ]
        for session in sessions:
            self._sessions[session.name] = session
            if session.spec.expected_capabilities:
                expected = tuple(caps | session.spec.tags for caps in session.spec.expected_capabilities)
                self._handle([ev.HostExpected(host_id=session.name, slot_capabilities=expected)])
        results = await asyncio.gather(*(s.start() for s in sessions), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(sessions):
            await self.close()
            first = errors[0]
            if isinstance(first, AgentError | TransportError):
                raise first
            raise AgentError(f"no host could be started: {first!r}") from first
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, TransportError) and not result.retryable:
                log.error("host %s cannot be used: %s", session.name, result)
                self._retire(session.name, str(result))
            elif isinstance(result, BaseException):
                log.warning("host %s failed to start: %s; retrying in the background", session.name, result)
                self._schedule_relaunch(session, str(result))
        self._monitor = asyncio.create_task(self._watch_liveness(), name="batuta-liveness")

    async def close(self) -> None:
        """Stop every host; tasks not yet resolved resolve as CANCELLED ("pool closed")."""
        if self._closed:
            return
        self._closed = True
        for task in [self._monitor, *self._relaunches.values()]:
            if task is not None:
                task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._submitted.clear()
        for task_id in list(self._pending):
            self._finish(task_id, TaskStatus.CANCELLED, reason="pool closed before the task finished")
        self._space.set()
        await asyncio.gather(*(s.close() for s in self._sessions.values()), return_exceptions=True)
        for task in [self._monitor, *self._relaunches.values()]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, task: Task) -> TaskFuture:
        """Queue a task; waits while the pool holds `max_queued` tasks (backpressure)."""
        while not self._scheduler.can_accept(len(self._submitted) + 1):
            self._check_open()
            self._space.clear()
            await self._space.wait()
        return self.submit_nowait(task)

    def submit_nowait(self, task: Task) -> TaskFuture:
        """Queue a task now; raises UsageError if the pool is full (see `submit`)."""
        self._check_open()
        if not isinstance(task, Task):
            raise UsageError(f"submit() takes a batuta.Task, not {type(task).__name__}")
        if not self._scheduler.can_accept(len(self._submitted) + 1):
            raise UsageError(
                f"the pool holds max_queued={self.config.scheduler.max_queued} tasks; "
                "await pool.submit(task) to wait for room"
            )
        loop = self._loop
        assert loop is not None
        if isinstance(task.call, KernelCall) and task.call.args:
            try:  # refuse here what the wire cannot carry, rather than failing a whole batch later
                check_value(task.call.args, where=f"task {task.name!r} arguments")
            except LocalProtocolError as exc:
                raise UsageError(str(exc)) from None
        choice = select_backend(
            task.call,
            task.backend,
            gpu_available=self._gpu_available,
            quadratic=isinstance(task.call, KernelCall) and _superlinear(task.call.name),
            thresholds=self.config.thresholds,
        )
        backend = choice.backend
        requires = _requirements(backend, task.requires)
        task_id = next(self._ids)
        now = loop.time()
        job = _current_job.get()
        future = TaskFuture(self, task_id, task, choice, job, now)
        if self._store is not None:
            kept = self._store.lookup(task, job)
            if kept is not None:
                return self._restore(future, replace(kept, task_id=task_id, job=job, restored=True))
        if isinstance(task.call, KernelCall) and task.call.args:
            refs = refs_in(task.call.args)
            if refs:
                future._object_ids = self._objects.acquire(refs, task.name)
        self._pending[task_id] = future
        if self.events.active:
            self.events.publish(
                pe.TaskQueued(
                    task_id=task_id,
                    name=task.name,
                    backend=backend.value,
                    at=now,
                    backend_reason=choice.reason,
                    job=job,
                )
            )
        self._submitted.append(
            ev.TaskSubmitted(
                task_id=task_id,
                priority=int(task.priority),
                requires=requires,
                timeout=task.timeout,
                max_attempts=task.max_attempts,
            )
        )
        if len(self._submitted) == 1:
            loop.call_soon(self._handle, [])  # this turn's submissions, together
        elif len(self._submitted) >= SUBMIT_BATCH:
            self._handle([])  # a long burst: schedule in batches, not all at the turn's end
        return future

    async def run(self, task: Task) -> TaskResult:
        """Submit and wait: the seed's `executor.execute(task).await`."""
        return await (await self.submit(task))

    execute = run

    def as_completed(self, tasks: Iterable[Task], *, window: int | None = None) -> AsyncIterator[TaskFuture]:
        """Stream `tasks` (any iterable, even endless) with at most `window` unresolved at once,
        yielding each TaskFuture as it finishes: memory bounded by the window, not the list.

            async with contextlib.aclosing(pool.as_completed(tasks)) as finished:
                async for future in finished:
                    print(future.task.name, future.result().value)

        The default window keeps every slot busy. Leaving early cancels what is unresolved.
        """
        return stream.as_completed(self, tasks, window)

    async def map(
        self,
        kernel: str,
        items: Iterable[Any],
        *,
        backend: Backend = Backend.AUTO,
        priority: Priority = Priority.NORMAL,
        timeout: float | None = None,
        max_attempts: int = 3,
    ) -> list[Any]:
        """Run `kernel` once per item (a tuple of args, or one arg) and return values in order.

        Fails fast: the first failed task cancels the rest and raises TaskFailedError with
        its result. For coarse granularity pass chunks, not elements (see `map_chunked`).
        """
        futures: list[TaskFuture] = []
        failure: list[TaskResult] = []

        def on_done(done: TaskFuture) -> None:
            result = done.result()
            if not result.is_success() and not failure:
                failure.append(result)
                for other in futures:
                    other.cancel()

        for item in items:
            args = item if isinstance(item, tuple) else (item,)
            task = Task.kernel(
                kernel, *args, backend=backend, priority=priority, timeout=timeout, max_attempts=max_attempts
            )
            fut = await self.submit(task)
            fut.add_done_callback(on_done)
            futures.append(fut)
            if failure:
                break
        try:
            results = await asyncio.gather(*(f.asyncio_future() for f in futures))
        except asyncio.CancelledError:  # our caller gave up: so do the tasks
            for fut in futures:
                self.cancel(fut.task_id)
            raise
        if failure:
            raise TaskFailedError(failure[0].describe_failure(), result=failure[0])
        return [r.value for r in results]

    async def map_chunked(
        self,
        kernel: str,
        *arrays: Any,
        chunk_size: int = 10_000,
        extra_args: tuple[Any, ...] = (),
        **options: Any,
    ) -> list[Any]:
        """Split equally long arrays into chunks of `chunk_size` and map `kernel` over them.

        The seed's advice in code: coarse tasks (`items.chunks(10_000)`) amortise the
        per-task round trip. Returns one value per chunk, in order.
        """
        if chunk_size < 1:
            raise UsageError(f"chunk_size must be >= 1, not {chunk_size}")
        if not arrays:
            raise UsageError("map_chunked needs at least one array")
        length = len(arrays[0])
        if any(len(a) != length for a in arrays):
            raise UsageError(f"map_chunked: arrays differ in length ({[len(a) for a in arrays]})")
        items = [
            tuple(a[start : start + chunk_size] for a in arrays) + tuple(extra_args)
            for start in range(0, length, chunk_size)
        ]
        return await self.map(kernel, items, **options)

    def put(self, value: Any) -> ObjectRef:
        """Keep `value` in the pool and return a ref to pass to kernels in its place.

        Each host receives the value once, with the first task that names it there, instead
        of with every task (Dask's `scatter`, Ray's `put`): for a matrix that a thousand
        tasks multiply, or a model that every chunk is scored against. Raises UsageError
        for a value that could not travel as a kernel argument.
        """
        self._check_open()
        return self._objects.put(value)

    def drop(self, ref: ObjectRef) -> None:
        """Release a `put` value, here and on the hosts, once no unresolved task names it."""
        if not isinstance(ref, ObjectRef):
            raise UsageError(f"pool.drop takes the ObjectRef that pool.put returned, not {type(ref).__name__}")
        self._send_drops(self._objects.drop(ref))

    def _send_drops(self, drops: dict[str, tuple[int, ...]]) -> None:
        for host, object_ids in drops.items():
            session = self._sessions.get(host)
            if session is not None:
                session.send(m.Drop(object_ids=object_ids))

    def set_result_store(self, store: ResultStore | None) -> None:
        """Consult `store` before running each task and record every success in it."""
        self._store = store

    def cancel(self, task_id: int) -> None:
        if task_id in self._pending and not self._closed:
            self._handle([ev.CancelRequested(task_id=task_id)])

    @contextlib.contextmanager
    def job(self, name: str) -> Iterator[str]:
        """Label every task submitted inside (this coroutine and tasks it spawns) as job `name`.

            with pool.job("kmeans"):
                await pool.map("kmeans_partial", chunks)

        Observers see the label on every event and result; `cancel_job(name)` cancels them all.
        """
        if not name:
            raise UsageError("a job needs a non-empty name")
        token = _current_job.set(name)
        try:
            yield name
        finally:
            _current_job.reset(token)

    def cancel_job(self, name: str) -> int:
        """Cancel every unresolved task of job `name`; returns how many were asked to cancel."""
        doomed = [task_id for task_id, pending in self._pending.items() if pending.job == name]
        if doomed and not self._closed:
            self._handle([ev.CancelRequested(task_id=task_id) for task_id in doomed])
        return len(doomed)

    # -- control ----------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop sending new work to hosts; running work continues."""
        self._handle([ev.SchedulingPaused()])

    def resume(self) -> None:
        self._handle([ev.SchedulingResumed()])

    def drain(self, host: str) -> None:
        """Send `host` no more work; a HostStateChanged('drained') follows when it is idle."""
        if host not in self._sessions:
            raise UsageError(f"no host named {host!r}; hosts: {', '.join(self._sessions)}")
        self._publish_host_state(host, "draining", "drain requested")
        self._handle([ev.HostDrainRequested(host_id=host)])

    def subscribe(self, callback: pe.Subscriber) -> Callable[[], None]:
        return self.events.subscribe(callback)

    # -- views ------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._scheduler.paused

    def stats(self) -> PoolStats:
        self._handle([])  # submissions not yet scheduled count as queued
        s = self._scheduler.stats
        return PoolStats(
            submitted=s.submitted,
            succeeded=self._succeeded,
            failed=self._failed,
            queued=self._scheduler.queued,
            in_flight=self._scheduler.in_flight,
            steals=s.steals,
            steal_backs=s.steal_backs_returned,
            retries=s.retries,
            dropped_results=s.dropped_results,
            restored=self._restored,
        )

    def slots(self) -> list[SlotView]:
        return self._scheduler.slots()

    def hosts(self) -> list[HostView]:
        now = asyncio.get_running_loop().time() if self._loop else 0.0
        views = []
        for session in self._sessions.values():
            hello = session.hello
            views.append(
                HostView(
                    name=session.name,
                    state=session.state,
                    description=session.description,
                    slots=len(hello.slots) if hello else 0,
                    gpus=tuple(g.name for g in hello.gpus) if hello else (),
                    cpu_count=hello.cpu_count if hello else 0,
                    last_heard_s=max(0.0, now - session.last_heard),
                )
            )
        return views

    @property
    def slot_count(self) -> int:
        return sum(1 for v in self._scheduler.slots() if v.state == "up")

    # -- HostListener -----------------------------------------------------------------------

    def host_ready(self, session: HostSession) -> None:
        hello = session.hello
        assert hello is not None
        self._objects.host_reset(session.name)  # a new agent process: its object store is empty
        joined: list[ev.Event] = []
        for info in hello.slots:
            slot_id = f"{session.name}/{info.slot}"
            self._slot_of[slot_id] = (session, info.slot)
            capabilities = frozenset(info.capabilities) | session.spec.tags
            joined.append(ev.SlotJoined(slot_id=slot_id, host_id=session.name, capabilities=capabilities))
            if CAP_GPU in info.capabilities:
                self._gpu_available = True
                gpu = next((g for g in hello.gpus if g.index == info.gpu_index), None)
                if gpu is not None:
                    # the seed's GpuExecutor: device name and capacity (compute units)
                    self._device_of[slot_id] = f"{gpu.name} ({gpu.compute_units} SMs)"
        if self.events.active:
            now = self._now()
            self.events.publish(
                pe.HostUp(
                    host=session.name,
                    slots=tuple(f"{session.name}/{i.slot}" for i in hello.slots),
                    gpus=tuple(g.name for g in hello.gpus),
                    cpu_count=hello.cpu_count,
                    batuta_version=hello.batuta_version,
                    python_version=hello.python_version,
                    at=now,
                )
            )
        self._handle(joined)

    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
        events: list[ev.Event] = []
        outcomes = self._outcomes
        publish = self.events.active
        now = self._now()
        host = session.name
        for msg in messages:
            kind = type(msg)
            if kind is m.Done:
                for outcome in msg.results:  # type: ignore[union-attr]
                    slot_id = f"{host}/{outcome.slot}"
                    outcomes[outcome.task_id] = (outcome, slot_id)
                    events.append(
                        ev.TaskOutcomeReported(
                            task_id=outcome.task_id,
                            slot_id=slot_id,
                            attempt=outcome.attempt,
                            outcome=outcome.status,
                            run_s=outcome.run_s,
                            reason=outcome.error or "",
                        )
                    )
            elif kind is m.Started:
                for task_id in msg.task_ids:  # type: ignore[union-attr]
                    pending = self._pending.get(task_id)
                    if pending is None or pending.slot_id is None or not pending.slot_id.startswith(host + "/"):
                        continue
                    pending.started_at = now
                    events.append(ev.TaskStartReported(task_id=task_id, slot_id=pending.slot_id))
                    if publish:
                        self.events.publish(
                            pe.TaskStarted(
                                task_id=task_id,
                                name=pending.task.name,
                                host=host,
                                slot=pending.slot_id,
                                attempt=self._scheduler.attempts(task_id),
                                at=now,
                                job=pending.job,
                            )
                        )
            elif kind is m.StealBackReply:
                events.append(
                    ev.StealBackAnswered(
                        slot_id=f"{host}/{msg.slot}",  # type: ignore[union-attr]
                        returned=tuple(msg.returned),  # type: ignore[union-attr]
                        refused=tuple(msg.refused),  # type: ignore[union-attr]
                    )
                )
            elif kind is m.Heartbeat:
                if publish:
                    self.events.publish(self._telemetry_event(session, msg, now))  # type: ignore[arg-type]
            elif kind is m.SlotChanged:
                events.extend(self._slot_state_events(session, msg, now))  # type: ignore[arg-type]
            elif kind is m.Bye:
                log.info("host %s says bye: %s", host, msg.reason)  # type: ignore[union-attr]
            elif kind is m.Error:
                log.error("host %s reports a protocol error: %s", host, msg.message)  # type: ignore[union-attr]
        try:
            self._handle(events)
        finally:
            outcomes.clear()

    def host_closed(self, session: HostSession, reason: str) -> None:
        if self._closed:
            return
        log.warning("host %s lost: %s", session.name, reason)
        now = self._now()
        if self.events.active:
            self.events.publish(pe.HostDown(host=session.name, reason=reason, at=now))
        self._handle([ev.HostLost(host_id=session.name, reason=reason)])
        self._schedule_relaunch(session, reason)

    # -- internals --------------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else 0.0

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("the pool is closed; create a new one")
        if not self._started:
            raise PoolClosedError("the pool is not started; use 'async with pool:' or 'await pool.start()'")

    def _handle(self, events: list[ev.Event]) -> None:
        """Run events through the scheduler and carry out what it says. Submissions queued
        since the last pass go first, so every other event sees them in order."""
        if self._submitted:
            events = [*self._submitted, *events]
            self._submitted = []
        if not events:
            return
        instructions = self._scheduler.handle_many(events, self._now())
        self._execute(instructions)

    def _execute(self, instructions: list[ev.Instruction]) -> None:
        resolved = False
        for ins in instructions:
            if isinstance(ins, ev.SendTasks):
                self._send_tasks(ins)
            elif isinstance(ins, ev.ResolveTask):
                self._resolve(ins)
                resolved = True
            elif isinstance(ins, ev.RequestStealBack):
                session, index = self._slot_of[ins.slot_id]
                session.send(m.StealBack(slot=index, task_ids=ins.task_ids))
            elif isinstance(ins, ev.AbortTasks):
                session, _index = self._slot_of[ins.slot_id]
                session.send(m.Cancel(task_ids=ins.task_ids))
            elif isinstance(ins, ev.AnnounceRequeue):
                self._on_requeued(ins)
            elif isinstance(ins, ev.AnnounceDrained):
                self._publish_host_state(ins.host_id, "drained", "no work left")
        if resolved and not self._space.is_set() and self._scheduler.can_accept():
            self._space.set()
        self._arm_timer()

    def _send_tasks(self, ins: ev.SendTasks) -> None:
        session, index = self._slot_of[ins.slot_id]
        requests = []
        for task_id, attempt in zip(ins.task_ids, ins.attempts, strict=True):
            pending = self._pending[task_id]
            if pending._object_ids:  # the values go first, in the same write as the Run
                for put in self._objects.puts_for(session.name, pending._object_ids):
                    session.send(put)
            pending.slot_id = ins.slot_id
            pending.started_at = None
            task = pending.task
            requests.append(
                m.TaskRequest(
                    task_id=task_id,
                    slot=index,
                    attempt=attempt,
                    call=task.call,
                    timeout=task.timeout,
                    backend=pending._choice.backend.value,
                )
            )
        session.send(m.Run(tasks=tuple(requests)))

    def _resolve(self, ins: ev.ResolveTask) -> None:
        got = self._outcomes.get(ins.task_id)
        if got is not None and ins.status is not TaskStatus.LOST:
            outcome, slot_id = got
            self._finish(
                ins.task_id,
                ins.status,
                reason=outcome.error or ins.reason or None,
                slot_id=slot_id,
                attempts=ins.attempts,
                value=outcome.value,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                exit_code=outcome.exit_code,
                run_s=outcome.run_s,
            )
        else:
            self._finish(ins.task_id, ins.status, reason=ins.reason or None, slot_id=ins.slot_id, attempts=ins.attempts)

    def _finish(
        self,
        task_id: int,
        status: TaskStatus,
        *,
        reason: str | None = None,
        slot_id: str | None = None,
        attempts: int = 0,
        value: Any = None,
        stdout: bytes = b"",
        stderr: bytes = b"",
        exit_code: int | None = None,
        run_s: float = 0.0,
    ) -> None:
        pending = self._pending.pop(task_id, None)
        if pending is None:
            return
        if not self._pending:
            # dicts never shrink their tables: start a fresh one whenever the pool runs dry,
            # so a burst of a million queued tasks does not hold its peak for the pool's life
            self._pending = {}
        now = self._now()
        started = pending.started_at if pending.started_at is not None else now - run_s
        queue_wait = max(0.0, started - pending.submitted_at) if slot_id else max(0.0, now - pending.submitted_at)
        host = slot_id.split("/", 1)[0] if slot_id else None
        result = TaskResult(
            task_id=task_id,
            name=pending.task.name,
            status=status,
            value=value,
            stdout=stdout,
            stderr=stderr,
            exit_code=exit_code,
            error=None if status is TaskStatus.SUCCEEDED else reason,
            duration=run_s,
            queue_wait=queue_wait,
            host=host,
            slot=slot_id,
            attempts=attempts,
            backend=pending._choice.backend,
            backend_reason=pending._choice.reason,
            job=pending.job,
            device=self._device_of.get(slot_id, "") if slot_id else "",
        )
        if pending._object_ids:
            self._send_drops(self._objects.release(pending._object_ids))
        if status is TaskStatus.SUCCEEDED:
            self._succeeded += 1
            if self._store is not None:
                self._store.record(pending.task, pending.job, result)
        else:
            self._failed += 1
        pending._resolve(result)
        if self.events.active:
            self.events.publish(pe.TaskFinished(result=result, at=now))

    def _restore(self, future: TaskFuture, result: TaskResult) -> TaskFuture:
        future._resolve(result)
        self._restored += 1
        if self.events.active:
            now = self._now()
            backend = result.backend.value if result.backend else ""
            self.events.publish(
                pe.TaskQueued(task_id=future.task_id, name=future.task.name, backend=backend, at=now, job=result.job)
            )
            self.events.publish(pe.TaskFinished(result=result, at=now))
        return future

    def _new_future(self) -> asyncio.Future[TaskResult]:
        loop = self._loop or asyncio.get_running_loop()
        return loop.create_future()

    def _call_soon(self, callback: Callable[[TaskFuture], None], future: TaskFuture) -> None:
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(callback, future)

    def _on_requeued(self, ins: ev.AnnounceRequeue) -> None:
        pending = self._pending.get(ins.task_id)
        if pending is not None:
            pending.slot_id = None
            pending.started_at = None
            if self.events.active:
                self.events.publish(
                    pe.TaskRequeued(
                        task_id=ins.task_id,
                        name=pending.task.name,
                        slot=ins.slot_id,
                        attempts=ins.attempts,
                        reason=ins.reason,
                        at=self._now(),
                        job=pending.job,
                    )
                )

    def _slot_state_events(self, session: HostSession, msg: m.SlotChanged, now: float) -> list[ev.Event]:
        slot_id = f"{session.name}/{msg.slot}"
        if self.events.active:
            self.events.publish(
                pe.SlotStateChanged(host=session.name, slot=slot_id, state=msg.state, reason=msg.reason, at=now)
            )
        if slot_id not in self._slot_of:
            return []
        if msg.state == m.SLOT_DOWN:
            return [ev.SlotLost(slot_id=slot_id, reason=msg.reason or "worker process gave up")]
        if msg.state == m.SLOT_UP:
            views = {v.slot_id: v for v in self._scheduler.slots()}
            view = views.get(slot_id)
            if view is not None and view.state in ("lost", "retired"):
                return [ev.SlotJoined(slot_id=slot_id, host_id=session.name, capabilities=view.capabilities)]
        return []

    def _telemetry_event(self, session: HostSession, hb: m.Heartbeat, now: float) -> pe.HostTelemetry:
        names = {g.index: g.name for g in session.hello.gpus} if session.hello else {}
        return pe.HostTelemetry(
            host=session.name,
            cpu_percent=hb.cpu_percent,
            memory_used=hb.memory_used,
            memory_total=hb.memory_total,
            gpus=tuple(
                pe.GpuReading(
                    index=g.index,
                    name=names.get(g.index, f"GPU {g.index}"),
                    utilization=g.utilization,
                    memory_used=g.memory_used,
                    memory_total=g.memory_total,
                    temperature=g.temperature,
                    power=g.power,
                )
                for g in hb.gpus
            ),
            gpu_status=hb.gpu_status,
            at=now,
        )

    def _publish_host_state(self, host: str, state: str, reason: str) -> None:
        if self.events.active:
            self.events.publish(pe.HostStateChanged(host=host, state=state, reason=reason, at=self._now()))

    def _arm_timer(self) -> None:
        wake = self._scheduler.next_wakeup()
        if wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = wake
        if wake is not None and self._loop is not None and not self._closed:
            self._timer = self._loop.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if not self._closed:
            self._handle([ev.TimerFired()])

    # -- liveness and relaunch --------------------------------------------------------------

    async def _watch_liveness(self) -> None:
        interval = max(0.05, min(self.config.heartbeat_interval, self.config.suspect_after) / 2)
        while not self._closed:
            await asyncio.sleep(interval)
            now = self._now()
            for session in list(self._sessions.values()):
                if session.state not in (HostState.UP, HostState.SUSPECTED):
                    continue
                silent = now - session.last_heard
                if silent > self.config.lost_after:
                    session.mark_lost(f"no heartbeat for {silent:.1f}s (lost after {self.config.lost_after:g}s)")
                elif silent > self.config.suspect_after and session.state == HostState.UP:
                    session.state = HostState.SUSPECTED
                    self._publish_host_state(session.name, "suspected", f"no heartbeat for {silent:.1f}s")
                elif silent <= self.config.suspect_after and session.state == HostState.SUSPECTED:
                    session.state = HostState.UP
                    self._publish_host_state(session.name, "up", "heard from again")

    def _schedule_relaunch(self, session: HostSession, reason: str) -> None:
        if self._closed or session.name in self._relaunches:
            return
        self._relaunches[session.name] = asyncio.create_task(
            self._relaunch(session, reason), name=f"relaunch-{session.name}"
        )

    async def _relaunch(self, session: HostSession, reason: str) -> None:
        delay = self.config.relaunch_backoff
        try:
            for attempt in range(1, self.config.max_relaunches + 1):
                await asyncio.sleep(delay)
                if self._closed:
                    return
                try:
                    await session.start()
                    log.info("host %s relaunched (attempt %d)", session.name, attempt)
                    self._publish_host_state(session.name, "up", f"relaunched after: {reason}")
                    return
                except (AgentError, TransportError, OSError) as exc:
                    reason = str(exc)
                    log.warning("host %s relaunch %d failed: %s", session.name, attempt, exc)
                    if isinstance(exc, TransportError) and not exc.retryable:
                        self._retire(session.name, reason)
                        return
                delay = min(delay * 2, 30.0)
            self._retire(session.name, f"gave up after {self.config.max_relaunches} relaunches: {reason}")
        finally:
            self._relaunches.pop(session.name, None)

    def _retire(self, host: str, why: str) -> None:
        """The host will not come back: work only it could run fails as unschedulable."""
        self._publish_host_state(host, "retired", why)
        self._handle([ev.HostLost(host_id=host, reason=why, retired=True)])


class PoolBuilder:
    """Fluent construction mirroring the seed's `Pool::builder().cpu_workers(n).build()`."""

    def __init__(self) -> None:
        self._cpu_workers: int | None = None
        self._gpu_workers = "auto"
        self._kernel_modules: list[str] = []
        self._hosts: list[HostSpec] = []
        self._config = PoolConfig()
        self._scheduler = SchedulerConfig()
        self._python: str | None = None
        self._local = True

    def cpu_workers(self, count: int | None) -> PoolBuilder:
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise UsageError(f"cpu_workers must be a positive int, not {count!r}")
        if count is not None and count > MAX_SLOTS:
            raise UsageError(f"cpu_workers({count}): one agent runs at most {MAX_SLOTS} slots")
        self._cpu_workers = count
        return self

    def gpu_workers(self, which: str) -> PoolBuilder:
        """'auto' (one slot per visible GPU), 'none', or a comma list of GPU indices."""
        self._gpu_workers = which
        return self

    def kernel_modules(self, modules: Iterable[str]) -> PoolBuilder:
        """Modules the agents import so that their `@kernel` functions are registered."""
        self._kernel_modules = list(modules)
        return self

    def host(self, spec: HostSpec) -> PoolBuilder:
        self._hosts.append(spec)
        return self

    def hosts(self, specs: Iterable[HostSpec]) -> PoolBuilder:
        self._hosts.extend(specs)
        return self

    def no_local(self) -> PoolBuilder:
        """Do not add this machine's agent (only the hosts given)."""
        self._local = False
        return self

    def python(self, executable: str) -> PoolBuilder:
        self._python = executable
        return self

    def seed(self, seed: int) -> PoolBuilder:
        self._config = replace(self._config, seed=seed)
        return self

    def heartbeat_interval(self, seconds: float) -> PoolBuilder:
        self._config = replace(self._config, heartbeat_interval=seconds)
        return self

    def liveness(self, *, suspect_after: float, lost_after: float) -> PoolBuilder:
        if not 0 < suspect_after <= lost_after:
            raise UsageError("liveness needs 0 < suspect_after <= lost_after")
        self._config = replace(self._config, suspect_after=suspect_after, lost_after=lost_after)
        return self

    def relaunch(self, *, max_relaunches: int, backoff: float) -> PoolBuilder:
        self._config = replace(self._config, max_relaunches=max_relaunches, relaunch_backoff=backoff)
        return self

    def max_queued(self, count: int) -> PoolBuilder:
        self._scheduler = replace(self._scheduler, max_queued=count)
        return self

    def window(self, *, min_window: int | None = None, max_window: int | None = None) -> PoolBuilder:
        changes = {k: v for k, v in (("min_window", min_window), ("max_window", max_window)) if v is not None}
        self._scheduler = replace(self._scheduler, **changes)
        return self

    def scheduler(self, config: SchedulerConfig) -> PoolBuilder:
        self._scheduler = config
        return self

    def build(self) -> Pool:
        hosts = list(self._hosts)
        if self._local and not any(h.name == "local" for h in hosts):
            hosts.insert(
                0,
                local_host(
                    self._cpu_workers, gpus=self._gpu_workers, kernel_modules=self._kernel_modules, python=self._python
                ),
            )
        return Pool(hosts, replace(self._config, scheduler=self._scheduler))


def local_host(
    cpu_workers: int | None = None,
    *,
    gpus: str = "auto",
    kernel_modules: Sequence[str] = (),
    python: str | None = None,
    name: str = "local",
    env: dict[str, str] | None = None,
) -> HostSpec:
    """A host agent on this machine, started as a subprocess (the embedded default)."""
    argv = agent_command(slots=cpu_workers, gpus=gpus, kernel_modules=kernel_modules, python=python, name=name)

    async def launch() -> Any:
        return await open_local_agent(argv, env=env, name=name)

    return HostSpec(name=name, launch=launch, expected_capabilities=(frozenset({CAP_CPU}),))
