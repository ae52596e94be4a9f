"""Kept results on the coordinator's side: what a kept task resolves to, what the journal keeps
of it, restoring it on resume, and making it again (lineage).

A kept task's agent reports `(ObjectRef, nbytes, shape, dtype)` in place of the value; its
future resolves to an `ObjectRef` that says so and where. A host lost with kept values: the
scheduler asks (`RecomputeObject`) and the recorded task runs again under a new task id with
the same object id. Under a job journal a kept result is journaled as what it is (not where:
the host's store does not outlive the run), keyed by how it is made; a resumed run restores
it as a ref to a value made nowhere yet, and makes it only when a task that is not itself
restored reads it, or `pool.get` asks for it. These are the pool's friends, like `inbound.py`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from batuta.core import events as ev
from batuta.core.objects import ObjectRef
from batuta.core.task import TaskResult, TaskStatus
from batuta.errors import UsageError
from batuta.runtime.dataplane import Prepared
from batuta.runtime.future import TaskFuture
from batuta.runtime.objects import KeptObject

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool

log = logging.getLogger("batuta.runtime.pool")


def kept_result(
    pool: Pool, pending: TaskFuture, status: TaskStatus, value: Any, reason: str | None, slot_id: str | None
) -> tuple[TaskStatus, Any, str | None]:
    """A kept task's (status, value, reason): its value is the ObjectRef to what its host kept."""
    object_id = pending._keep
    if status is not TaskStatus.SUCCEEDED or slot_id is None:
        _unmade(pool, object_id, f"its producer, task {pending.task_id}, {status.value}: {reason}")
        return status, None, reason
    if not (type(value) is tuple and len(value) == 4 and type(value[0]) is ObjectRef and type(value[1]) is int):
        why = f"the agent reported a kept result as {type(value).__name__}, not (ref, nbytes, shape, dtype)"
        _unmade(pool, object_id, why)
        return TaskStatus.FAILED, None, why
    _ref, nbytes, shape, dtype = value
    host = slot_id.split("/", 1)[0]
    size = 1
    for n in shape if type(shape) is tuple else ():
        size *= int(n)
    kept = pool._objects.kept(object_id)
    ref = ObjectRef(
        object_id,
        digest=kept.digest if kept is not None else "",
        nbytes=nbytes,
        size=size if shape else 0,
        shape=tuple(shape) if type(shape) is tuple else (),
        dtype=dtype if type(dtype) is str else "",
        host=host,
        pool=pool._objects.owner,
    )
    pool._objects.kept_made(object_id, host, ref)
    return status, ref, reason


def _unmade(pool: Pool, object_id: int, why: str) -> None:
    """A kept task ended without its value. Made before (this was a re-run after a loss), the
    caller holds its ref: `pool.get` says why it is gone. Never made, its future resolves to
    no ref, so nothing could drop the object: it goes now, or with the last task naming it."""
    pool._objects.kept_lost(object_id, why)
    kept = pool._objects.kept(object_id)
    if kept is not None and kept.ref is None:
        pool._send_drops(pool._objects.drop(ObjectRef(object_id, pool=pool._objects.owner)))


def journaled(result: TaskResult) -> TaskResult:
    """What the journal keeps of a result: of a kept one, what it is, not where (the host's
    store does not outlive the run)."""
    ref = result.value
    if type(ref) is not ObjectRef or not ref.host:
        return result
    about = {"batuta_kept": ref.digest, "nbytes": ref.nbytes, "shape": list(ref.shape), "dtype": ref.dtype}
    return replace(result, value=about)


def restored_kept(pool: Pool, future: TaskFuture, prepared: Prepared, journaled: TaskResult, digest: str) -> TaskResult:
    """A kept result found in the journal: a ref to a value made nowhere yet (made again
    when a task that is not itself restored reads it, or when `get` asks for it)."""
    about = journaled.value if isinstance(journaled.value, dict) else {}
    kept = pool._objects.keep(prepared.task, future.job, future, prepared.reads, prepared.after, digest)
    kept.restored = True
    shape = tuple(int(n) for n in about.get("shape", ()))
    size = 1
    for n in shape:
        size *= n
    kept.ref = ObjectRef(
        kept.object_id,
        digest=digest,
        nbytes=int(about.get("nbytes", 0)),
        size=size if shape else 0,
        shape=shape,
        dtype=str(about.get("dtype", "")),
        pool=pool._objects.owner,
    )
    future._keep = kept.object_id
    return replace(journaled, value=kept.ref)


def remake_restored(pool: Pool, kept: KeptObject) -> None:
    kept.restored = False
    kept.producer = pool.submit_nowait(kept.task, _remake=kept)


def remake(pool: Pool, ins: ev.RecomputeObject | ev.AnnounceObjectLost) -> None:
    """Run a lost kept object's recorded task again, as a new task (lineage); or, lost more
    often than its producer's attempts allow, note why it is gone for `pool.get`."""
    if isinstance(ins, ev.AnnounceObjectLost):
        pool._objects.kept_lost(ins.object_id, ins.reason)
        return
    kept = pool._objects.kept(ins.object_id)
    if kept is None or pool._closed:
        return
    try:
        kept.producer = pool.submit_nowait(kept.task, _remake=kept)
    except UsageError as exc:  # an input of its own was dropped meanwhile: it cannot be remade
        why = f"lost ({ins.reason}) and cannot be made again: {exc}"
        pool._objects.kept_lost(ins.object_id, why)
        lost: list[ev.Event] = [ev.ObjectLost(object_id=ins.object_id, reason=why)]
        pool._call_soon(lambda: pool._handle(lost))
        return
    log.info("object %d %s: running task %d again as %d", ins.object_id, ins.reason, ins.task_id, kept.producer.task_id)
