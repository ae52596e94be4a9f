"""`Pool`: the asyncio coordinator around the sans-I/O scheduler.

The pool is the thin shell of the dask worker-state-machine pattern: it turns what host
agents say into scheduler events, runs the scheduler's instructions (send, steal back,
abort, resolve), keeps each task's payload and future, and publishes events for observers.
Every placement decision is the core's; whether a host is alive is `core.liveness`'s, driven
by `runtime.hosts`. The future and the builder live beside it (`future.py`, `builder.py`),
and so does the reading of what hosts say (`inbound.py`).

    async with Pool.builder().cpu_workers(4).build() as pool:
        result = await pool.run(Task.kernel("vadd", a, b))
        values = await pool.map("mc_pi", [(1_000_000, seed) for seed in range(16)])
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from batuta.core import events as ev
from batuta.core.backend import select_backend
from batuta.core.objects import ObjectRef, refs_in
from batuta.core.scheduler import Scheduler
from batuta.core.task import CAP_GPU, Backend, KernelCall, Priority, Task, TaskResult, TaskStatus
from batuta.errors import PoolClosedError, UsageError
from batuta.protocol import messages as m
from batuta.runtime import events as pe
from batuta.runtime import inbound, journaling, kept, mapping, stream
from batuta.runtime.builder import PoolBuilder, PoolConfig, local_host
from batuta.runtime.code import CodeSpec, ShippedCode
from batuta.runtime.dataplane import DataPlane, Prepared
from batuta.runtime.future import ResultStore, TaskFuture
from batuta.runtime.hosts import HostSupervisor
from batuta.runtime.job_label import current_job, job_label
from batuta.runtime.loop_owner import check_loop
from batuta.runtime.objects import KeptObject, ObjectTable
from batuta.runtime.requirements import requirements, superlinear
from batuta.runtime.session import HostSession, HostSpec, SendBudget
from batuta.runtime.shipping import CodeAcks, CodeShipped, collect, with_code
from batuta.runtime.snapshot import InFlight, explain_read_only, taken
from batuta.runtime.turns import LoopTurns, sends_early
from batuta.runtime.views import HostView, PoolStats, SlotView
from batuta.runtime.wakeup import WakeupTimer

__all__ = ["Pool", "PoolBuilder", "PoolConfig", "ResultStore", "TaskFuture", "local_host"]

log = logging.getLogger("batuta.runtime.pool")

SUBMIT_BATCH = 1024  # most submissions held back for one scheduling pass


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
        self._budget = SendBudget()
        self._burst_count = 0  # submissions since the pool was last idle (`submit`)
        self._turns = LoopTurns()  # the inbound work of one loop iteration, over all hosts (turns.py)
        self._hosts = HostSupervisor(
            self._specs, self, self.config, send_budget=self._budget, turns=self._turns, clock=self._now
        )
        self._slot_of: dict[str, tuple[HostSession, int]] = {}
        self._pending: dict[int, TaskFuture] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer = WakeupTimer(lambda: self._handle([ev.TimerFired()]))
        self._space = asyncio.Event()
        self._started = False
        self._closed = False
        self._in_flight = InFlight()  # large arguments and put values, read-only while used
        self._succeeded = 0
        self._failed = 0
        self._cancelled = 0
        self._store: ResultStore | None = None
        self._device_of: dict[str, str] = {}  # GPU slot id -> "name (N SMs)"
        self._restored = 0
        self._objects = ObjectTable()
        self._data = DataPlane(self)
        self._code_of: dict[str, str] = {}  # host -> digest of the user's code it runs
        self._shipped = ShippedCode()  # the journal keys the user's kernels by its digest
        self._acks = CodeAcks()  # hosts `ship` waits for
        # Submissions of one loop turn reach the scheduler together (see `_handle`): one
        # scheduling pass and one Run per slot for a burst, instead of one each per task.
        self._submitted: list[ev.Event] = []
        self._burst_bytes = 0  # argument bytes of those submissions
        self._closers: list[Callable[[], Awaitable[None]]] = []  # see `add_closer`

    # -- construction -----------------------------------------------------------------------

    @staticmethod
    def builder() -> PoolBuilder:
        """The seed's builder: `Pool.builder().cpu_workers(n).build()`."""
        return PoolBuilder()

    @classmethod
    def local(
        cls, cpu_workers: int | None = None, *, gpu_workers: str | Sequence[int] = "auto", seed: int = 0, **options: Any
    ) -> Pool:
        """A pool on this machine only: one local agent with `cpu_workers` slots (default: cores).
        `options` are the builder's one-value settings by name (PoolBuilder.LOCAL_OPTIONS):
        `Pool.local(2, max_queued=1000)` is `Pool.builder().cpu_workers(2).max_queued(1000)`."""
        for key in options:
            if key not in PoolBuilder.LOCAL_OPTIONS:  # else getattr would find build, no_local, ...
                takes = ", ".join(("cpu_workers", "gpu_workers", "seed", *PoolBuilder.LOCAL_OPTIONS))
                raise UsageError(
                    f"Pool.local({key}=...): unknown keyword; it takes {takes} (Pool.builder() has the rest)"
                )
        builder = cls.builder().cpu_workers(cpu_workers).gpu_workers(gpu_workers).seed(seed)
        for key, value in options.items():
            getattr(builder, key)(value)
        return builder.build()

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        explain_read_only(exc, self)  # NumPy's message names neither batuta nor the fix
        await self.close()

    async def start(self) -> None:
        """Launch every host concurrently and wait for their handshakes.

        Hosts that fail to start are retried in the background; the pool starts if at least
        one host is up, and raises the first error if none is.
        """
        if self._closed:
            raise UsageError("this pool is closed, and a pool starts once: build a new one")
        if self._started:
            raise UsageError("pool already started")
        if not self._code_of:
            self.prepare_code()  # a CodeError (bad --module, over the limit) before any host starts
        self._started = True
        self._loop = asyncio.get_running_loop()
        for spec in self._specs:
            if spec.expected_capabilities:
                expected = tuple(caps | spec.tags for caps in spec.expected_capabilities)
                self._handle([ev.HostExpected(host_id=spec.name, slot_capabilities=expected)])
        try:
            await self._hosts.start()
        except BaseException:
            await self.close()
            raise

    def prepare_code(self, code: CodeSpec | None = None) -> None:
        """Collect the user's code to ship (runtime/code.py): each session sends its host's
        bundle right after every Welcome, and every task sent there names its digest. `start()`
        does this unless it was done before (to find a `CodeError` early: a bad --module path,
        too much code). `code`: what to ship from now on (`ship`), kept once it is collected."""
        bundles = collect(code or self.config.code, self._specs)  # all, or a CodeError
        self.config = replace(self.config, code=code or self.config.code)
        for name, bundle in bundles.items():
            self._hosts.sessions[name].code = bundle
            self._code_of[name] = bundle.digest if bundle is not None else ""
        self._shipped = ShippedCode(session.code for session in self._hosts.sessions.values())

    async def ship(self, modules: Iterable[str | Path] = (), *, job_files: Iterable[str | Path] = ()) -> CodeShipped:
        """Add `modules` (.py files, package folders) and `job_files` (the modules of their folder
        that they import) to the code this pool ships, and ship it to every host now, once the
        tasks already on the hosts are done; returns once each host has stored it (the hosts
        import it right after, and a task sent meanwhile waits there for that; `await
        shipped.import_errors()` for how the imports went: see runtime/shipping.py). Raises
        CodeError (a bad path, too much code) before that."""
        self._check_open()
        code = with_code(self.config.code, modules, job_files)
        if {n: b.digest if b else "" for n, b in collect(code, self._specs).items()} == self._code_of:
            return CodeShipped(digest=self._shipped.digest, unchanged=True)
        async with self._acks.one_at_a_time:
            was_paused = self.paused
            self.pause(recall=False)  # nothing more goes out for the old code; what is out finishes with it
            try:
                await self._acks.until(lambda: not any(p.slot_id for p in self._pending.values()))
                self._check_open()
                before = dict(self._code_of)
                self.prepare_code(with_code(self.config.code, modules, job_files))
                return await self._acks.send(self._hosts.sessions, before, self._shipped.digest)
            finally:
                if not was_paused and not self._closed:
                    self.resume()

    async def close(self) -> None:
        """Stop every host; tasks not yet resolved resolve as CANCELLED ("pool closed").

        A state transition first: the scheduler resolves what is unresolved and places
        nothing more, so what the hosts still say while they shut down changes nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._timer.close()
        self._acks.close()
        self._handle([ev.ShutdownRequested(reason="pool closed before the task finished")])
        self._space.set()
        await self._hosts.close()
        self._in_flight.release_puts()  # the caller's put arrays are writeable again
        for closer in self._closers:
            try:
                await closer()
            except Exception:  # one failing closer must not keep the others from running
                log.exception("closing the pool: %r failed", closer)

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await `closer()` when the pool closes, after its hosts: what came with them and
        outlives no pool (an allocation's batch job, runtime/allocation.py)."""
        self._closers.append(closer)

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, task: Task, *, keep: bool = False) -> TaskFuture:
        """Queue a task; waits while the pool holds `max_queued` tasks, or while more than
        `send_budget` bytes wait for hosts that are slow to read them (backpressure).

        `keep=True` leaves the result on the host that made it: the future's value is an
        `ObjectRef` (shape, dtype, nbytes, host) to pass to other tasks, which then run there
        if they can; `await pool.get(ref)` fetches it, `pool.drop(ref)` frees it. A task whose
        arguments name an unfinished `TaskFuture` (or a kept ref) waits for it, and fails
        (or is cancelled) with its upstream, naming it."""
        while not self._scheduler.can_accept(len(self._submitted) + 1) or self._over_budget():
            self._check_open()
            self._space.clear()
            await self._space.wait()
        if not self._pending:  # a burst into an idle pool begins
            self._burst_count = 0
        future = self.submit_nowait(task, keep=keep)
        if future.done() and future.result().restored:  # nothing to send: a turn only when one is due
            if self._turns.spent():
                await self._turns.yield_turn()
            return future
        self._burst_count += 1
        if self._burst_bytes >= self.config.send_high_water or self._turns.spent() or sends_early(self._burst_count):
            # Place what was submitted and let the sessions write it now (their flushes are
            # queued): the next submission sees whether the hosts keep up, the hosts start while
            # the rest is submitted, and the results that came meanwhile are read.
            self._burst_bytes = 0
            self._handle([])
            await self._turns.yield_turn()  # the hosts' readers too, not only the loop's timers
        return future

    def submit_nowait(self, task: Task, *, keep: bool = False, _remake: KeptObject | None = None) -> TaskFuture:
        """Queue a task now; raises UsageError if the pool is full (see `submit`). `_remake`:
        a kept object lost with its host, whose recorded task runs again (lineage)."""
        self._check_open()
        if not isinstance(task, Task):
            raise UsageError(f"submit() takes a batuta.Task, not {type(task).__name__}")
        if not self._scheduler.can_accept(len(self._submitted) + 1):
            # From a callback (a done callback: no task runs) asyncio only logs this, and a
            # program counting on the task then waits for ever: say how to wait for room there.
            where = (
                ""
                if asyncio.current_task() is not None
                else ("; from a callback, asyncio.get_running_loop().create_task(pool.submit(task))")
            )
            raise UsageError(
                f"the pool holds max_queued={self.config.scheduler.max_queued} tasks; "
                f"await pool.submit(task) from a coroutine to wait for room{where}"
            )
        loop = self._loop
        assert loop is not None
        job = current_job.get()
        asked = None  # asked for before its arguments are copied and prepared (journaling.py)
        if self._store is not None and _remake is None and not keep and journaling.plain(task):
            asked = journaling.ask_first(self, self._store, task, job, loop.time())
            if asked.done():
                return asked
        large: list[Any] = []  # the arguments as they are now: copied, or read-only until done (snapshot.py)
        if isinstance(task.call, KernelCall) and _remake is None:
            args = taken(task.call.args, large, self._in_flight)
            task = task if args is task.call.args else replace(task, call=replace(task.call, args=args))
        prepared = self._data.prepare(task) if _remake is None else Prepared(task, reads=_remake.reads)
        call = prepared.task.call
        nbytes = journaling.checked_nbytes(call, task.name) if asked is None else asked._nbytes
        choice = select_backend(
            call,  # kept refs among the arguments count by their elements
            task.backend,
            gpu_available=self._scheduler.offers(CAP_GPU),
            quadratic=isinstance(task.call, KernelCall) and superlinear(task.call.name),
            thresholds=self.config.thresholds,
            requires=task.requires,
        )
        backend = choice.backend
        requires = requirements(backend, task.requires)
        if asked is None:
            future = TaskFuture(self, next(self._ids), task, choice, job, loop.time())
        else:  # its arguments as copied (what a record keys and samples, as for any task)
            future, future.task, future._choice, future._journal_task = asked, task, choice, task
        task_id, now = future.task_id, future.submitted_at
        future._nbytes = nbytes
        future._call = call
        self._burst_bytes += nbytes
        digest = ""
        if self._store is not None and _remake is None and asked is None:
            digest, journaled = journaling.look_up(self, self._store, future, task, prepared, keep)
            if journaled is not None:
                if keep:
                    journaled = kept.restored_kept(self, future, prepared, journaled, digest)
                return journaling.restore(self, future, journaled)
        for object_id in prepared.reads:
            restored = self._objects.kept(object_id)
            if restored is not None and restored.restored:
                kept.remake_restored(self, restored)
        if isinstance(call, KernelCall) and call.args:
            refs = refs_in(call.args)
            if refs:
                future._object_ids = self._objects.acquire(refs, task.name)
        if _remake is not None:
            future._keep = _remake.object_id
        elif keep:
            made = self._objects.keep(prepared.task, job, future, prepared.reads, prepared.after, digest)
            future._keep = made.object_id
        future._held = self._in_flight.hold(large)
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
                    waiting_on=self._data.waiting_on(prepared),
                )
            )
        if prepared.failed is not None:  # an upstream ended badly before this was submitted
            status, reason = prepared.failed
            self._finish(task_id, status, reason=reason)
            return future
        self._submitted.append(
            ev.TaskSubmitted(
                task_id=task_id,
                priority=int(task.priority),
                requires=requires,
                timeout=task.timeout,
                max_attempts=task.max_attempts,
                after=prepared.after,
                reads=prepared.reads,
                keep_as=future._keep,
                puts=prepared.puts,
            )
        )
        if len(self._submitted) == 1:
            loop.call_soon(self._turns.run, self._handle, [])  # this turn's submissions, together (turns.py)
        elif len(self._submitted) >= SUBMIT_BATCH:
            self._handle([])  # a long burst: schedule in batches, not all at the turn's end
        return future

    async def run(self, task: Task) -> TaskResult:
        """Submit and wait: the seed's `executor.execute(task).await`. Cancelled while it waits
        (`asyncio.wait_for`), it cancels the task: no handle is left to stop it (`submit` gives one)."""
        future = await self.submit(task)
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            raise

    execute = run

    def as_completed(self, tasks: Iterable[Task], *, window: int | None = None) -> AsyncGenerator[TaskFuture, None]:
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
        keep: bool = False,
    ) -> list[Any]:
        """Run `kernel` once per item (a tuple of args, or one arg) and return values in order.

        Fails fast: the first failed task cancels the rest and raises TaskFailedError with
        its result. For coarse granularity pass chunks, not elements (see `map_chunked`).
        `keep=True`: the values are ObjectRefs to results left where they were made (dropped
        if the map raises: it returns no refs to drop them by).
        """
        tasks = (
            Task.kernel(
                kernel,
                *(item if isinstance(item, tuple) else (item,)),
                backend=backend,
                priority=priority,
                timeout=timeout,
                max_attempts=max_attempts,
            )
            for item in items
        )
        return await mapping.map_tasks(self, tasks, keep=keep)

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
        per-task round trip. Returns one value per chunk, in order. The arrays are read-only
        until it returns: the chunks go without a copy, and a write to an array meanwhile
        (from another coroutine) would give some chunks the old data and some the new.
        """
        with mapping.held_read_only(self._in_flight, arrays):
            return await self.map(kernel, mapping.chunks(arrays, chunk_size, extra_args), **options)

    def put(self, value: Any) -> ObjectRef:
        """Keep `value` as it is now (copied, or its large arrays read-only until dropped:
        snapshot.py); the ref goes to kernels in its place. Each host receives it once, with
        the first task that names it there (Dask's `scatter`, Ray's `put`). Raises UsageError
        for a value that could not travel as a kernel argument; nothing is sent here, so flow
        control applies at the submission of a task naming it."""
        self._check_open()
        large: list[Any] = []
        ref = self._objects.put(taken(value, large, self._in_flight))
        self._in_flight.hold_put(ref.object_id, large)
        return ref

    def drop(self, ref: ObjectRef) -> None:
        """Release a `put` value or a kept result, here and on every host holding it, once
        no unresolved task names it."""
        check_loop(self._loop)
        self._objects.check(ref, "pool.drop")
        self._send_drops(self._objects.drop(ref))

    async def get(self, ref: ObjectRef) -> Any:
        """The value of a kept result (`keep=True`), fetched from a host that holds it; it waits
        for the value to be made (or made again after its host was lost). A put value is
        returned as it is. Raises ObjectLostError when it can no longer be had."""
        self._check_open()
        self._objects.check(ref, "pool.get")
        restored = self._objects.kept(ref.object_id)
        if restored is not None and restored.restored:  # from a resumed run's journal: make it now
            kept.remake_restored(self, restored)
        return await self._data.get(ref)

    def _send_drops(self, dropped: tuple[dict[str, tuple[int, ...]], list[int]]) -> None:
        drops, forgotten = dropped
        for object_id in forgotten:  # a put's arrays are the caller's again only now: a refill
            self._in_flight.drop_put(object_id)  # before, reached hosts not yet sent the value
        for host, object_ids in drops.items():
            session = self._hosts.sessions.get(host)
            if session is not None:
                session.send(m.Drop(object_ids=object_ids))
        if forgotten:  # the scheduler never makes them again; on the next turn (we may be in _handle)
            released: list[ev.Event] = [ev.ObjectReleased(object_id=i) for i in forgotten]
            self._call_soon(lambda: self._handle(released))

    def set_result_store(self, store: ResultStore | None) -> None:
        """Consult `store` before running each task and record every success in it."""
        self._store = store

    def cancel(self, task_id: int) -> None:
        check_loop(self._loop)  # as every call of the caller's: on the pool's own loop only
        if task_id in self._pending and not self._closed:
            self._handle([ev.CancelRequested(task_id=task_id)])

    def job(self, name: str) -> contextlib.AbstractContextManager[str]:
        """Label every task submitted inside (this coroutine and tasks it spawns) as job `name`.

            with pool.job("kmeans"):
                await pool.map("kmeans_partial", chunks)

        Observers see the label on every event and result; `cancel_job(name)` cancels them all.
        """
        return job_label(name)

    def cancel_job(self, name: str) -> int:
        """Cancel every unresolved task of job `name`; returns how many were asked to cancel."""
        check_loop(self._loop)
        doomed = [task_id for task_id, pending in self._pending.items() if pending.job == name]
        if doomed and not self._closed:
            self._handle([ev.CancelRequested(task_id=task_id) for task_id in doomed])
        return len(doomed)

    # -- control ----------------------------------------------------------------------------

    def pause(self, *, recall: bool = True) -> None:
        """Start nothing more: tasks hosts hold unstarted come back (`recall`); running ones finish."""
        check_loop(self._loop)
        self._handle([ev.SchedulingPaused(recall=recall)])

    def resume(self) -> None:
        check_loop(self._loop)
        self._handle([ev.SchedulingResumed()])

    def drain(self, host: str, *, undo: bool = False) -> None:
        """Send `host` no more work (HostStateChanged 'drained' once idle), or again with `undo`."""
        check_loop(self._loop)
        if host not in self._hosts.sessions:
            raise UsageError(f"no host named {host!r}; hosts: {', '.join(self._hosts.sessions)}")
        if undo:  # the scheduler first: an undo lifts an unfit mark, which "up" must not be said under
            unfit = self._scheduler.unfit_reason(host)
            self._handle([ev.HostDrainRequested(host_id=host, undo=True)])
            self.host_state_changed(host, *inbound.undrained(self._scheduler, self._hosts.sessions[host], unfit))
        else:  # "draining" first: a host with nothing to finish is said "drained" at once, after it
            self.host_state_changed(host, "draining", "drain requested")
            self._handle([ev.HostDrainRequested(host_id=host)])

    def subscribe(self, callback: pe.Subscriber) -> Callable[[], None]:
        return self.events.subscribe(callback)

    # -- views ------------------------------------------------------------------------------

    @property
    def code_digest(self) -> str:
        """The digest of the user's code this pool ships ("" when none): what a journal binds
        its checkpoints to."""
        return self._shipped.digest

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
            cancelled=self._cancelled,
            queued=self._scheduler.queued,
            in_flight=self._scheduler.in_flight,
            steals=s.steals,
            steal_backs=s.steal_backs_returned,
            retries=s.retries,
            requeues=s.requeues,
            dropped_results=s.dropped_results,
            fed_ahead=s.fed_ahead,
            restored=self._restored,
            waiting=self._scheduler.waiting,
            relayed_bytes=self._objects.relayed_bytes,
            fetched_bytes=self._objects.fetched_bytes,
        )

    def slots(self) -> list[SlotView]:
        return self._scheduler.slots()

    def hosts(self) -> list[HostView]:
        return inbound.host_views(self._hosts.views(), self._scheduler)

    @property
    def slot_count(self) -> int:
        return sum(1 for v in self._scheduler.slots() if v.state == "up")

    # -- what the host supervisor reports (runtime.hosts.PoolSide) ----------------------------

    def host_ready(self, session: HostSession) -> None:
        self._objects.host_reset(session.name)  # a new agent process: its object store is empty
        self._handle(inbound.joined_events(self, session))

    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None:
        self._handle(inbound.events_from(self, session, messages))

    def host_lost(self, host: str, reason: str, *, retired: bool) -> None:
        """Liveness decided: the host is lost (relaunched later) or retired (never again)."""
        if self._closed:
            return
        self._acks.gone(host)
        if retired:
            self.host_state_changed(host, "retired", reason)
        elif self.events.active:
            self.events.publish(pe.HostDown(host=host, reason=reason, at=self._now()))
        self._data.host_lost(host)  # its fetches end; its objects are gone with its agent
        self._objects.host_reset(host)
        self._handle([ev.HostLost(host_id=host, reason=reason, retired=retired)])
        self._wake_submitters()  # its unread bytes left the send budget with it

    def host_suspected(self, host: str, *, suspected: bool) -> None:
        """Silent past suspect_after, or heard from again: a suspected host gets only the work no other can run."""
        self._handle([ev.HostSuspected(host_id=host, heard_again=not suspected)])

    def host_state_changed(self, host: str, state: str, reason: str) -> None:
        state, reason = inbound.still_held(self._scheduler, host, state, reason)
        if self.events.active:
            self.events.publish(pe.HostStateChanged(host=host, state=state, reason=reason, at=self._now()))

    def host_writable(self, session: HostSession) -> None:
        self._wake_submitters()

    def _wake_submitters(self) -> None:
        if not self._over_budget() and not self._space.is_set() and self._scheduler.can_accept():
            self._space.set()

    # -- internals --------------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else 0.0

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("the pool is closed; create a new one")
        if not self._started:
            raise PoolClosedError("the pool is not started; use 'async with pool:' or 'await pool.start()'")
        check_loop(self._loop)

    def _over_budget(self) -> bool:
        return self._budget.congested_bytes > self.config.send_budget

    def _handle(self, events: list[ev.Event]) -> None:
        """Run events through the scheduler and carry out what it says. Submissions queued
        since the last pass go first, so every other event sees them in order."""
        if self._submitted:
            events = [*self._submitted, *events]
            self._submitted = []
            self._burst_bytes = 0
        if not events:
            return
        instructions = self._scheduler.handle_many(events, self._now())
        self._execute(instructions)

    def _execute(self, instructions: list[ev.Instruction]) -> None:
        resolved = False
        if self._objects.in_use and len(instructions) > 1:
            # resolutions first: a task sent in this batch may read a value resolved in it
            # (not those of tasks sent in it: a cancel of a task just sent resolves it too)
            sent = {t for i in instructions if isinstance(i, ev.SendTasks) for t in i.task_ids}
            first = [i for i in instructions if isinstance(i, ev.ResolveTask) and i.task_id not in sent]
            if first:
                moved = {id(i) for i in first}
                instructions = first + [i for i in instructions if id(i) not in moved]
        for ins in instructions:
            if isinstance(ins, ev.SendTasks):
                self._send_tasks(ins)
            elif isinstance(ins, ev.ResolveTask):
                inbound.resolve(self, ins)
                resolved = True
            elif isinstance(ins, ev.RequestStealBack):
                session, index = self._slot_of[ins.slot_id]
                session.send(m.StealBack(slot=index, task_ids=ins.task_ids))
            elif isinstance(ins, ev.AbortTasks):
                session, _index = self._slot_of[ins.slot_id]
                session.send(m.Cancel(task_ids=ins.task_ids))
            elif isinstance(ins, ev.AnnounceRequeue):
                inbound.requeued(self, ins)
            elif isinstance(ins, ev.AnnounceDrained | ev.AnnounceUnfit):
                inbound.announce_host(self, ins)
            elif isinstance(ins, ev.RecomputeObject | ev.AnnounceObjectLost):
                kept.remake(self, ins)
        if resolved and not self._space.is_set() and self._scheduler.can_accept() and not self._over_budget():
            self._space.set()
        if self._loop is not None:
            self._timer.arm(self._scheduler.next_wakeup())

    def _send_tasks(self, ins: ev.SendTasks) -> None:
        """One Run per slot and turn; cut where its arrays reach the session's high-water mark,
        so that flow control can stop between the parts."""
        session, index = self._slot_of[ins.slot_id]
        limit = session.high_water
        code = session.code_digest
        requests: list[m.TaskRequest] = []
        nbytes = 0
        now = self._now()
        for task_id, attempt in zip(ins.task_ids, ins.attempts, strict=True):
            pending = self._pending[task_id]
            pending.slot_id = ins.slot_id
            pending.started_at, pending.sent_at = None, now
            task = pending.task
            request = m.TaskRequest(
                task_id=task_id,
                slot=index,
                attempt=attempt,
                call=pending._call,
                timeout=task.timeout,
                backend=pending._choice.backend.value,
                code=code,
                keep=pending._keep,
                tail=bool(ins.tail) and task_id in ins.tail,  # kept stealable at its agent (core/tailfeed.py)
            )
            # the values go first, in the same write as the Run; kept values this host lacks
            # are relayed first, and the Run waits for them (dataplane.py)
            if pending._object_ids and not self._data.send(session, ins.slot_id, pending, request, ins.made_ahead):
                continue
            if requests and nbytes + pending._nbytes > limit:
                session.send(m.Run(tasks=tuple(requests)), nbytes)
                requests, nbytes = [], 0
            requests.append(request)
            nbytes += pending._nbytes
        if requests:
            session.send(m.Run(tasks=tuple(requests)), nbytes)

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
        self._in_flight.release(pending._held)
        if not self._pending:
            # dicts never shrink their tables: start a fresh one whenever the pool runs dry,
            # so a burst of a million queued tasks does not hold its peak for the pool's life
            self._pending = {}
        now = self._now()
        if pending._keep:
            status, value, reason = kept.kept_result(self, pending, status, value, reason, slot_id)
        self._objects.task_finished(task_id, value, status is TaskStatus.SUCCEEDED)
        started = pending.started_at if pending.started_at is not None else now - run_s
        queue_wait = max(0.0, started - pending.submitted_at) if slot_id else max(0.0, now - pending.submitted_at)
        host = slot_id.split("/", 1)[0] if slot_id else None
        result = TaskResult(
            task_id=task_id,
            name=pending.task.name,
            status=status,
            value=value,
            stdout=stdout,
            stderr=stderr if status is TaskStatus.SUCCEEDED else self._shipped.user_paths(stderr, host),
            exit_code=exit_code,
            error=None if status is TaskStatus.SUCCEEDED else self._shipped.failure(pending.task.call, reason, stderr),
            duration=run_s,
            queue_wait=queue_wait,
            host=host,
            slot=slot_id,
            attempts=attempts,
            backend=pending._choice.backend,
            backend_reason=pending._choice.reason,
            job=pending.job,
            device=self._device_of.get(slot_id, "") if slot_id else "",
            code=self._code_of.get(host, "") if host else "",
        )
        if pending._object_ids:
            self._send_drops(self._objects.release(pending._object_ids))
        if self._store is not None:  # every ending: a failed task's place is its own (JournalStore)
            self._store.record(pending._journal_task, pending.job, kept.journaled(result), code=pending._code)
        if status is TaskStatus.SUCCEEDED:
            self._succeeded += 1
        elif status is TaskStatus.CANCELLED:
            self._cancelled += 1
        else:
            self._failed += 1
        pending._resolve(result)
        self._acks.check()
        if self.events.active:
            self.events.publish(pe.TaskFinished(result=result, at=now))

    def _new_future(self) -> asyncio.Future[TaskResult]:
        loop = self._loop or asyncio.get_running_loop()
        return loop.create_future()

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(callback, *args)
