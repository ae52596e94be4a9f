"""Kept results and tasks that feed tasks, on the coordinator: arguments, relays, fetches.

The scheduler core decides when a task that names other tasks' results may run and where
(`core/deps.py`); this module does what that needs on the wire:

* `prepare` turns a task's arguments that name futures into what travels: a kept result's
  `ObjectRef`, or for a result that is not kept, a *fed* object the value fills in when it
  comes back (`runtime/objects.py`). A finished upstream is used at once: its value, or,
  when it failed or was cancelled, the reason the dependent fails with.
* `send` gives a task's host the objects it names before its Run. A kept value that host
  lacks is fetched from a host that holds it (`Fetch`, answered like a task result) and
  relayed: the Run waits here until the value arrived and went out as a Put, once per host
  (the coordinator keeps the relayed copy until the object is dropped). Hosts never talk
  to each other. If no host holds it any more, the attempt ends as a crash: the scheduler
  requeues the task, which waits for the value to be made again.
* `get` fetches a kept value for the caller, waiting for it to be made (again) if need be.

Fetches to a host that is lost fail at once; a `get` then waits for the lineage re-run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta.core import events as ev
from batuta.core.objects import ObjectRef
from batuta.core.task import KernelCall, Outcome, Task, TaskStatus
from batuta.errors import ObjectLostError, UsageError
from batuta.protocol import messages as m
from batuta.runtime.future import TaskFuture
from batuta.runtime.session import HostSession

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool

GET_TRIES = 16  # fetch attempts of one pool.get (each host loss under it costs one)


class _HostGone(Exception):
    """A fetch's host was lost before it answered."""


@dataclass(slots=True, eq=False)
class _Fetch:
    object_id: int
    host: str
    waiter: asyncio.Future[Any] | None = None  # a pool.get; None: a relay


@dataclass(slots=True, eq=False)
class _HeldRun:
    """A task sent to a slot whose host still lacks kept values it reads."""

    session: HostSession
    slot_id: str
    request: m.TaskRequest
    nbytes: int
    object_ids: tuple[int, ...]
    missing: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A task's arguments as they travel, and what the scheduler must know of them."""

    task: Task
    after: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()
    puts: tuple[tuple[int, int], ...] = ()  # put values among them, with their sizes (core/deps.py)
    failed: tuple[TaskStatus, str] | None = None  # an upstream that already ended badly


class DataPlane:
    """One pool's fetches and held runs. Called from the pool's event loop only."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._fetches: dict[int, _Fetch] = {}  # request id -> what it fetches
        self._relaying: dict[int, int] = {}  # object id -> the request id relaying it
        self._held: dict[int, list[_HeldRun]] = {}  # object id -> runs waiting for it

    # -- submission --------------------------------------------------------------------------

    def prepare(self, task: Task) -> Prepared:
        """Replace futures in `task`'s arguments (see the module docstring)."""
        call = task.call
        if not isinstance(call, KernelCall) or not call.args:
            return Prepared(task)
        after: list[int] = []
        reads: list[int] = []
        puts: dict[int, int] = {}
        failed: list[tuple[TaskStatus, str]] = []
        args = tuple(self._replaced(item, after, reads, failed, 1, puts) for item in call.args)
        # by identity: `==` compared a finished future's array value with the future (ValueError)
        if not after and not reads and not failed and all(a is b for a, b in zip(args, call.args, strict=True)):
            return Prepared(task, puts=tuple(puts.items())) if puts else Prepared(task)
        prepared = replace(task, call=KernelCall(name=call.name, args=args)) if args is not call.args else task
        return Prepared(
            prepared,
            after=tuple(dict.fromkeys(after)),
            reads=tuple(dict.fromkeys(reads)),
            puts=tuple(puts.items()),
            failed=failed[0] if failed else None,
        )

    def _replaced(
        self,
        value: Any,
        after: list[int],
        reads: list[int],
        failed: list[tuple[TaskStatus, str]],
        depth: int,
        puts: dict[int, int],
    ) -> Any:
        if isinstance(value, TaskFuture):
            return self._from_future(value, after, reads, failed)
        if type(value) is ObjectRef:
            if self._pool._objects.kept(value.object_id) is not None:
                reads.append(value.object_id)
            else:
                puts[value.object_id] = value.nbytes
            return value
        if depth > 32:
            return value
        if type(value) is tuple:
            return tuple(self._replaced(item, after, reads, failed, depth + 1, puts) for item in value)
        if type(value) is list:
            return [self._replaced(item, after, reads, failed, depth + 1, puts) for item in value]
        if type(value) is dict:
            return {key: self._replaced(item, after, reads, failed, depth + 1, puts) for key, item in value.items()}
        return value

    def _from_future(
        self, future: TaskFuture, after: list[int], reads: list[int], failed: list[tuple[TaskStatus, str]]
    ) -> Any:
        if future._pool is not self._pool:
            raise UsageError(f"a task names {future!r}, a task of another pool; pass its value instead")
        objects = self._pool._objects
        if future.done():
            result = future.result()
            if result.status is not TaskStatus.SUCCEEDED:
                status = TaskStatus.CANCELLED if result.status is TaskStatus.CANCELLED else TaskStatus.FAILED
                failed.append(
                    (
                        status,
                        f"upstream task {future.task_id} ({future.task.name}) {result.status.value}: {result.error}",
                    )
                )
                return None
            value = result.value
            if type(value) is ObjectRef and objects.kept(value.object_id) is not None:
                reads.append(value.object_id)
            return value
        if future._keep:
            reads.append(future._keep)
            kept = objects.kept(future._keep)
            return ObjectRef(future._keep, digest=kept.digest if kept is not None else "", pool=objects.owner)
        after.append(future.task_id)  # a journal names it otherwise (runtime/journaling.py)
        return ObjectRef(objects.fed_object(future.task_id), pool=objects.owner)

    def waiting_on(self, prepared: Prepared) -> tuple[int, ...]:
        """The unfinished tasks whose results a prepared task needs (for observers)."""
        if not prepared.after and not prepared.reads:
            return ()
        producers = []
        for object_id in prepared.reads:
            kept = self._pool._objects.kept(object_id)
            if kept is not None and kept.ref is None:
                producers.append(kept.producer.task_id)
        return tuple(dict.fromkeys([*prepared.after, *producers]))

    # -- sending -----------------------------------------------------------------------------

    def send(
        self,
        session: HostSession,
        slot_id: str,
        future: TaskFuture,
        request: m.TaskRequest,
        made_ahead: tuple[int, ...],
    ) -> bool:
        """Send `session` the objects `future`'s task names; False when the Run must wait
        for kept values to be relayed (it is then held here and sent when they arrive).
        `made_ahead`: objects tasks sent to that slot before it make there (fed ahead)."""
        ids = tuple(i for i in future._object_ids if i not in made_ahead) if made_ahead else future._object_ids
        puts, missing = self._pool._objects.puts_for(session.name, ids)
        for put, put_bytes in puts:
            session.send(put, put_bytes)
        if not missing:
            return True
        held = _HeldRun(session, slot_id, request, future._nbytes, ids, set(missing))
        for object_id in missing:
            self._held.setdefault(object_id, []).append(held)
            if object_id not in self._relaying:
                self._relay(object_id, session.name)
        return False

    def _relay(self, object_id: int, to_host: str) -> None:
        sources = [h for h in self._pool._objects.holders(object_id) if h != to_host]
        session = next((self._pool._hosts.sessions[h] for h in sources if h in self._pool._hosts.sessions), None)
        if session is None:
            self._relay_failed(object_id, f"input object {object_id} is on no live host")
            return
        request_id = next(self._pool._ids)
        self._fetches[request_id] = _Fetch(object_id, session.name)
        self._relaying[object_id] = request_id
        session.send(m.Fetch(object_id=object_id, request_id=request_id))

    def _relayed(self, object_id: int, value: Any) -> None:
        self._relaying.pop(object_id, None)
        objects = self._pool._objects
        nbytes = _array_bytes(value)
        objects.relayed(object_id, value, nbytes)
        for held in self._held.pop(object_id, []):
            held.missing.discard(object_id)
            if not held.missing:
                self._release(held)

    def _release(self, held: _HeldRun) -> None:
        """Send a held Run, if its task is still where the scheduler put it."""
        pool = self._pool
        request = held.request
        pending = pool._pending.get(request.task_id)
        if pending is None:  # cancelled meanwhile: the scheduler waits for the agent to say so
            self._report(held, Outcome.CANCELLED, "cancelled")
            return
        if pending.slot_id != held.slot_id or pool._scheduler.attempts(request.task_id) != request.attempt:
            return  # requeued elsewhere meanwhile
        puts, missing = pool._objects.puts_for(held.session.name, held.object_ids)
        if missing:  # dropped from the coordinator meanwhile: go round again
            held.missing = set(missing)
            for object_id in missing:
                self._held.setdefault(object_id, []).append(held)
                if object_id not in self._relaying:
                    self._relay(object_id, held.session.name)
            return
        for put, put_bytes in puts:
            held.session.send(put, put_bytes)
        held.session.send(m.Run(tasks=(request,)), held.nbytes)

    def _relay_failed(self, object_id: int, reason: str) -> None:
        self._relaying.pop(object_id, None)
        for held in self._held.pop(object_id, []):
            if held.missing:
                held.missing.clear()
                self._report(held, Outcome.CRASHED, f"{reason}; it waits to be made again")

    def _report(self, held: _HeldRun, outcome: Outcome, reason: str) -> None:
        """Tell the scheduler how the held attempt ended, on the next loop turn."""
        event = ev.TaskOutcomeReported(
            task_id=held.request.task_id,
            slot_id=held.slot_id,
            attempt=held.request.attempt,
            outcome=outcome,
            reason=reason,
        )
        self._pool._call_soon(lambda: self._pool._handle([event]))

    # -- answers -----------------------------------------------------------------------------

    def is_fetch(self, task_id: int) -> bool:
        return task_id in self._fetches

    def fetched(self, outcome: m.TaskOutcome) -> None:
        """A host answered a Fetch (a Done whose task id is the request's)."""
        fetch = self._fetches.pop(outcome.task_id, None)
        if fetch is None:
            return
        ok = outcome.status is Outcome.OK
        if fetch.waiter is None:
            if ok:
                self._relayed(fetch.object_id, outcome.value)
            else:
                self._relay_failed(fetch.object_id, outcome.error or "the host could not send it")
        elif not fetch.waiter.done():
            if ok:
                self._pool._objects.fetched_bytes += _array_bytes(outcome.value)
                fetch.waiter.set_result(outcome.value)
            else:
                fetch.waiter.set_exception(_HostGone(outcome.error or "fetch failed"))

    def host_lost(self, host: str) -> None:
        """Fetches to `host` will never be answered."""
        for request_id, fetch in list(self._fetches.items()):
            if fetch.host != host:
                continue
            del self._fetches[request_id]
            if fetch.waiter is None:
                self._relay_failed(fetch.object_id, f"host {host}, which held input object {fetch.object_id}, was lost")
            elif not fetch.waiter.done():
                fetch.waiter.set_exception(_HostGone(f"host {host} was lost"))

    # -- pool.get ----------------------------------------------------------------------------

    async def get(self, ref: ObjectRef) -> Any:
        pool = self._pool
        objects = pool._objects
        object_id = ref.object_id
        last = ""
        for _ in range(GET_TRIES):
            present, value = objects.cached(object_id)
            if present:
                # A put value is the caller's own; a relayed kept one is the copy later hosts
                # are sent: the caller gets one of their own, or a write into what get returned
                # changed the next get's value and what those hosts computed on.
                return value if objects.kept(object_id) is None else _own_copy(value)
            kept = objects.kept(object_id)
            if kept is None:
                raise UsageError(f"pool.get: object {object_id} is not in this pool (dropped, or of another pool)")
            if kept.lost:
                raise ObjectLostError(f"object {object_id}: {kept.lost}")
            holders = [h for h in objects.holders(object_id) if h in pool._hosts.sessions]
            if not holders:
                producer = kept.producer
                result = await producer
                if kept.producer is producer and result.status is not TaskStatus.SUCCEEDED:
                    raise ObjectLostError(f"object {object_id}: its producer {result.status.value}: {result.error}")
                continue
            request_id = next(pool._ids)
            waiter: asyncio.Future[Any] = pool._new_future()
            self._fetches[request_id] = _Fetch(object_id, holders[0], waiter)
            pool._hosts.sessions[holders[0]].send(m.Fetch(object_id=object_id, request_id=request_id))
            try:
                return await waiter
            except _HostGone as exc:
                last = str(exc)  # the pool has forgotten that host's objects and asked for a re-run
                continue
        raise ObjectLostError(f"object {object_id}: not fetched after {GET_TRIES} tries (last: {last})")


def _own_copy(value: Any, depth: int = 0) -> Any:
    """`value` with each array in it (inside tuples, lists and dicts too) copied."""
    if isinstance(value, np.ndarray):
        return value.copy(order="K")  # its layout too (a Fortran-ordered array stays so)
    if depth > 32:
        return value
    if isinstance(value, tuple):
        return tuple(_own_copy(item, depth + 1) for item in value)
    if isinstance(value, list):
        return [_own_copy(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {key: _own_copy(item, depth + 1) for key, item in value.items()}
    return value


def _array_bytes(value: Any, depth: int = 0) -> int:
    """The bytes of the arrays in `value`, inside tuples, lists and dicts too (a kept tuple of
    arrays relayed 16 MiB and counted none)."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if depth > 32:
        return 0
    if isinstance(value, (tuple, list)):
        return sum(_array_bytes(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(_array_bytes(item, depth + 1) for item in value.values())
    return 0
