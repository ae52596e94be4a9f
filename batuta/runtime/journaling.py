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
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from batuta.core.objects import UNREPEATABLE, ObjectRef
from batuta.core.task import KernelCall, Task, TaskResult
from batuta.runtime.dataplane import Prepared
from batuta.runtime.future import ResultStore, TaskFuture
from batuta.runtime.objects import result_name as name_of_call

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool


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
