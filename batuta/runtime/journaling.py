"""The pool's side of a `ResultStore` (the job journal): what a submitted task is keyed by.

A task's arguments may name other tasks' results (a future, a kept ref). What travels is
the value when the producer has finished, a ref to it otherwise (`dataplane.py`); the store
sees neither, but each producer by one name for its result (`result_name`), whether it had
finished or not. A resumed run restores producers at once, so a consumer keyed by the value
it read met another key than the one it was journaled under, and ran again (with a warning
that the job had changed, for one keyed by place). The name covers how the result is made
and the code its kernel comes from, so a consumer of an edited producer runs again too (it
named the producer by kernel and arguments alone, and got the old code's result back).

A producer that is not pure and not restored in this run makes a value its journaled
consumers did not read: those are not restored (`restore=False`), but run and are journaled
again at their places. The rest of the keys are the store's (`observers/journal.py`).

A task whose arguments name no future and no ref (`plain`) is keyed by its arguments as
given, so the store is asked before they are copied (`snapshot.taken`) and prepared: a
restored task costs its check for the wire, its key and its read (`ask_first`), and is
never sent. Its check comes first still: a task refused there must take no place in the
store's count of the job's tasks (its lookup counts one, hit or not).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from batuta.core.backend import BackendChoice
from batuta.core.objects import UNREPEATABLE, ObjectRef
from batuta.core.task import Backend, BinaryCall, KernelCall, Task, TaskResult
from batuta.errors import UsageError
from batuta.protocol.codec import check_value
from batuta.protocol.errors import LocalProtocolError
from batuta.runtime import events as pe
from batuta.runtime.dataplane import Prepared
from batuta.runtime.future import ResultStore, TaskFuture
from batuta.runtime.objects import result_name as name_of_call

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool


_UNCHOSEN = BackendChoice(backend=Backend.AUTO, reason="not chosen yet")  # `ask_first`'s future, until the pool chooses
_PLAIN = frozenset({int, float, bool, str, bytes, type(None)})


def plain(task: Task) -> bool:
    """Whether no future and no ref is among `task`'s arguments where `DataPlane.prepare`
    looks (it then leaves them as they are): such a task may be asked for first."""
    call = task.call
    return isinstance(call, BinaryCall) or all(_plain(item, 1) for item in call.args)


def _plain(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is tuple or kind is list:  # as deep as `prepare` looks; deeper: not asked first
        return depth <= 32 and all(_plain(item, depth + 1) for item in value)
    if kind is dict:
        return depth <= 32 and all(_plain(item, depth + 1) for item in value.values())
    return kind is not ObjectRef and not isinstance(value, TaskFuture)


def checked_nbytes(call: KernelCall | BinaryCall, name: str) -> int:
    """What `call`'s arguments add to a frame; UsageError here for what the wire cannot carry,
    rather than failing a whole batch later."""
    if not isinstance(call, KernelCall) or not call.args:
        return 0
    try:
        return check_value(call.args, where=f"task {name!r} arguments")
    except LocalProtocolError as exc:
        raise UsageError(str(exc)) from None


def ask_first(pool: Pool, store: ResultStore, task: Task, job: str, now: float) -> TaskFuture:
    """Ask `store` for a `plain` task that is not kept, before its arguments are copied and
    prepared: a future resolved when restored (it is never sent), else the future the pool's
    submission goes on with (its id taken, its key asked for, its arguments checked)."""
    nbytes = checked_nbytes(task.call, task.name)  # first: a refused task takes no place in the store
    future = TaskFuture(pool, next(pool._ids), task, _UNCHOSEN, job, now)
    future._nbytes = nbytes
    _, journaled = look_up(pool, store, future, task, Prepared(task), keep=False)
    if journaled is not None:
        restore(pool, future, journaled)
    return future


def restore(pool: Pool, future: TaskFuture, journaled: TaskResult) -> TaskFuture:
    """Resolve `future` with the store's result: copied only where the store did not make it
    as this task's (`JournalStore` does)."""
    result = journaled
    if not (result.restored and result.task_id == future.task_id and result.job == future.job):
        result = replace(result, task_id=future.task_id, job=future.job, restored=True)
    future._resolve(result)
    pool._restored += 1
    if pool.events.active:
        now = pool._now()
        backend = result.backend.value if result.backend else ""
        pool.events.publish(
            pe.TaskQueued(task_id=future.task_id, name=future.task.name, backend=backend, at=now, job=result.job)
        )
        pool.events.publish(pe.TaskFinished(result=result, at=now))
    return future


def look_up(
    pool: Pool, store: ResultStore, future: TaskFuture, task: Task, prepared: Prepared, keep: bool
) -> tuple[str, TaskResult | None]:
    """Key `future`'s task (`task`, its arguments as the caller gave them) for `store` and ask
    it for a journaled result: (the name of its kept result, "" when not kept; the result to
    restore, or None to run it)."""
    future._code = pool._shipped.digest_for(task.call)
    fresh: list[TaskFuture] = []
    named = task
    if prepared.task is not task and isinstance(task.call, KernelCall):  # futures among its arguments
        args = tuple(_named(item, fresh, 1) for item in task.call.args)
        named = replace(task, call=replace(task.call, args=args))
    future._journal_task = named
    future._journal_name = ""  # made when a reader or a keep asks (`result_name`)
    digest = ""
    if keep:  # keyed by how it is made (by place where that is no name for it: UNREPEATABLE)
        digest = result_name(future)
        if not digest.startswith(UNREPEATABLE):  # readers in a resumed run make it again on demand
            future._journal_task = replace(named, key=f"kept:{digest}")
    restore = prepared.failed is None and not fresh and not _reads_made_anew(pool, prepared)
    journaled = store.lookup(
        future._journal_task, future.job, code=future._code, task_id=future.task_id, restore=restore, given_key=task.key
    )
    return digest, journaled


def result_name(future: TaskFuture) -> str:
    """The name of `future`'s result in the keys of the tasks that read it (made once)."""
    name = future._journal_name
    if name is None:  # submitted before the store was set: journaled nowhere, so no run repeats it
        name = future._journal_name = f"{UNREPEATABLE}{secrets.token_hex(16)}"
    elif not name:
        task = future._journal_task
        if task.key is not None:  # the caller vouches that equal keys mean equal results
            text = f"batuta-key\0{task.key}\0{future._code}".encode("utf-8", "surrogatepass")
            name = hashlib.sha256(text).hexdigest()[:32]
        else:  # the backend as asked: AUTO's choice may vary by run
            name = name_of_call(task.call, task.backend.value, future._code)
        future._journal_name = name
    return name


def _named(value: Any, fresh: list[TaskFuture], depth: int) -> Any:
    """`value` with each future inside replaced by a ref naming its result; `fresh` gets those
    that are not pure and run in this run (kept ones are `_reads_made_anew`'s)."""
    if isinstance(value, TaskFuture):
        name = result_name(value)
        restored = value.done() and value.result().restored
        if name.startswith(UNREPEATABLE) and not value._keep and not restored:
            fresh.append(value)
        return ObjectRef(0, digest=name)
    if depth > 32:
        return value
    if type(value) is tuple:
        return tuple(_named(item, fresh, depth + 1) for item in value)
    if type(value) is list:
        return [_named(item, fresh, depth + 1) for item in value]
    if type(value) is dict:
        return {key: _named(item, fresh, depth + 1) for key, item in value.items()}
    return value


def _reads_made_anew(pool: Pool, prepared: Prepared) -> bool:
    """Whether a kept value the task reads is not pure and made in this run (not restored, or
    made again since for a task that was not restored)."""
    for object_id in prepared.reads:
        kept = pool._objects.kept(object_id)
        if kept is not None and kept.digest.startswith(UNREPEATABLE) and not kept.restored:
            return True
    return False
