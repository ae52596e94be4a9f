"""`TaskFuture`, what `Pool.submit` returns, and `ResultStore`, where results outlive a run.

A future is also the pool's own record of its task while it is unresolved (where it was
sent, when it started), and it creates an asyncio future only when someone waits: a million
queued tasks then cost one small object each, not three.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from batuta.core.backend import BackendChoice
from batuta.core.task import BinaryCall, KernelCall, Task, TaskResult, TaskStatus

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool


class ResultStore(Protocol):
    """Where finished results are kept across runs (a job journal, for `--resume`).

    `lookup` is asked at submission (with the task's id): a hit resolves the task at once
    without running it. `record` is told every result of a task that ran, whatever its
    status (a store keeps the succeeded ones). Both run on the event loop: keep them quick
    and hand slow I/O to a thread. `code` is the digest of the user's shipped code that the
    task's kernel comes from (`runtime.code.ShippedCode`), "" for built-in kernels and
    binaries: a store must key by it, so that a result of old code is never handed back.
    `restore` False: the task reads a value made anew in this run that its journaled result
    may not have read (`runtime/journaling.py`); it runs, and its result replaces that one.
    `given_key`: the `Task.key` the user gave, where `task`'s is the one a kept result is
    journaled under ("kept:..."), for what the store says of the task. A result `lookup`
    makes as the task's (its `task_id`, `job`, `restored=True`) is the future's as it is;
    another is copied so (`journaling.restore`).
    """

    def lookup(
        self, task: Task, job: str, *, code: str, task_id: int, restore: bool, given_key: str | None = None
    ) -> TaskResult | None: ...

    def record(self, task: Task, job: str, result: TaskResult, *, code: str) -> None: ...


class TaskFuture:
    """A submitted task. `await` it for its `TaskResult`; `cancel()` cancels the task.

    It is also the pool's own record of the task while it is unresolved (where it was sent,
    when it started), and it creates an asyncio future only when someone waits: a million
    queued tasks then cost one small object each, not three.
    """

    __slots__ = (
        "_call",
        "_callbacks",
        "_choice",
        "_code",
        "_held",
        "_journal_name",
        "_journal_task",
        "_keep",
        "_nbytes",
        "_object_ids",
        "_pool",
        "_result",
        "_waiter",
        "job",
        "sent_at",
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
        self.sent_at: float | None = None  # when its Run last went out (the host's round trip)
        self._result: TaskResult | None = None
        self._waiter: asyncio.Future[TaskResult] | None = None
        self._callbacks: list[Callable[[TaskFuture], None]] | None = None
        self._object_ids: tuple[int, ...] = ()  # pool.put objects its arguments name
        self._nbytes = 0  # what its arguments' arrays add to a frame (flow control)
        self._held: list[Any] = []  # its large arguments, read-only until it is done (snapshot.py)
        self._code = ""  # the code digest its ResultStore key names (see ResultStore)
        self._call: KernelCall | BinaryCall = task.call  # as sent: futures among its arguments replaced
        self._keep = 0  # the object its result is kept as (keep=True), 0 when it comes back
        self._journal_task = task  # what the ResultStore keys it by (futures among its arguments named)
        self._journal_name: str | None = None  # its result's name in its readers' keys (journaling.py)

    def __await__(self) -> Generator[Any, None, TaskResult]:
        if self._result is None:
            # shielded: a caller that gives up waiting must not cancel the shared waiter
            yield from asyncio.shield(self.asyncio_future()).__await__()
        assert self._result is not None
        return self._result

    def asyncio_future(self) -> asyncio.Future[TaskResult]:
        """An asyncio future for the result (`asyncio.gather`, `as_completed` and `wait` take the
        TaskFuture itself too)."""
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

    def remove_done_callback(self, callback: Callable[[TaskFuture], None]) -> int:
        """Forget `callback`; returns how many times it was registered (asyncio.wait calls it)."""
        if not self._callbacks:
            return 0
        kept = [registered for registered in self._callbacks if registered != callback]
        removed = len(self._callbacks) - len(kept)
        self._callbacks = kept or None
        return removed

    def cancelled(self) -> bool:
        """Whether the task ended cancelled (asyncio's futures' question, for asyncio.wait)."""
        return self._result is not None and self._result.status is TaskStatus.CANCELLED

    def exception(self) -> BaseException | None:
        """None once done: a task that failed is a result, not an exception (`unwrap()` raises
        it); before, asyncio.InvalidStateError, as asyncio's futures raise."""
        self.result()
        return None

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
