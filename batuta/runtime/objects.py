"""The coordinator's side of objects: put values, kept results, and values that feed tasks.

Three kinds of object share one id space and one table:

* *put* values (`pool.put`): the coordinator holds the value and sends it to a host lazily,
  in the same write as (and just before) the first Run that needs it there, so a put that
  no task uses costs nothing but coordinator memory, and a host that joins later gets only
  what its tasks name;
* *kept* results (`keep=True`): the value stays on the host that made it (its agent's
  object store); the table knows which hosts hold a copy, the task that made it (lineage),
  and, only if the value ever had to move to another host, a copy relayed through here;
* *fed* values: the result of an unfinished, not kept task that another task names as an
  argument. It fills in when that task succeeds and travels like a put value; it is
  forgotten with the last task that names it.

When a host's agent starts again (relaunch after a loss), its store is empty: `host_reset`
forgets what it held, and the next task sent there carries the Put again. `drop` is safe at
any time: while unresolved tasks still name the object, the coordinator keeps it (and the
hosts keep their copies) until the last of them resolves.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta.core.backend import element_count
from batuta.core.objects import UNREPEATABLE, ObjectRef, refs_in
from batuta.core.task import Task
from batuta.errors import UsageError
from batuta.protocol import messages as m
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import check_value, encode_messages_parts
from batuta.protocol.errors import LocalProtocolError
from batuta.transport.dropbehind import DropBehind

if TYPE_CHECKING:
    from batuta.runtime.future import TaskFuture


def _elements_of(value: Any) -> int:
    """Array elements in `value` as `Backend.AUTO` would count it passed directly: itself, or
    the items of a tuple or list."""
    return element_count(tuple(value) if isinstance(value, tuple | list) else (value,))


def _nbytes_of(value: Any) -> int:
    streams = OutgoingStreams()  # as `put` encodes it: large arrays as chunks (views, not copies)
    parts = encode_messages_parts((m.Put(object_id=0, value=value),), streams=streams)
    return sum(memoryview(part).nbytes for part in (*parts, *streams.all_chunk_parts()))


def repeatable(call: Any) -> bool:
    """Whether `call` gives equal results for equal arguments: a kernel registered pure here,
    reading no result that is not (`UNREPEATABLE`). Only then does how a value is made
    (`lineage_digest`) name the value: the readers of ten random samples, keyed by the
    sampler's kernel and arguments, were one task to a journal (and so were the readers of
    ten pure tasks that each read one of them)."""
    from batuta.core.task import KernelCall
    from batuta.kernels import registry

    if not isinstance(call, KernelCall):
        return False
    if any(ref.digest.startswith(UNREPEATABLE) for ref in refs_in(call.args)):
        return False
    found = registry.known(call.name)
    return found is not None and found.pure


def result_name(call: Any, backend: str, code: str = "") -> str:
    """The name a journal knows a result of `call` by, in the keys of the tasks that read it:
    how it is made (with `code`, the digest of the user's code its kernel comes from), marked
    `UNREPEATABLE` when that does not tell its value (a journal then keys its readers by
    place). `call` as the journal sees it: the results it reads by their own names."""
    made = lineage_digest(call, backend, code)
    return made if repeatable(call) else f"{UNREPEATABLE}{made}"


def lineage_digest(call: Any, backend: str, code: str = "") -> str:
    """A name for what `call` computes, stable from run to run: its kernel (or binary),
    arguments (refs by their own digests) and `code` (the user's code the kernel comes from:
    an edit is another computation; "" for built-in kernels and binaries)."""
    h = hashlib.sha256(b"batuta-lineage-1\0" + backend.encode() + b"\0")
    _feed(h, getattr(call, "name", getattr(call, "path", "")), 0)
    _feed(h, getattr(call, "args", ()), 0)
    if code:  # built-in kernels keep their names
        h.update(b"c" + code.encode() + b"\0")
    return h.hexdigest()[:32]


def _feed(h: Any, value: Any, depth: int) -> None:
    t = type(value)
    if t is ObjectRef:
        h.update(b"r" + value.digest.encode() + b"\0")
    elif isinstance(value, np.ndarray) and not value.dtype.hasobject:
        h.update(b"a%s%r" % (value.dtype.str.encode(), value.shape))
        h.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    elif (t is tuple or t is list) and depth < 64:
        h.update(b"%s%d:" % (b"t" if t is tuple else b"l", len(value)))
        for item in value:
            _feed(h, item, depth + 1)
    elif t is dict and depth < 64:
        h.update(b"d%d:" % len(value))
        for key in sorted(value, key=str):
            _feed(h, key, depth + 1)
            _feed(h, value[key], depth + 1)
    else:
        text = repr(value).encode("utf-8", "surrogatepass")
        h.update(b"v%s%d:" % (t.__name__.encode(), len(text)) + text)


@dataclass(slots=True, eq=False)
class KeptObject:
    """A kept result: how it was made (to make it again) and what it turned out to be."""

    object_id: int
    task: Task  # the producing task, its arguments as sent (futures replaced by refs)
    job: str
    producer: TaskFuture  # the run that makes it now (a new one after a loss)
    ref: ObjectRef | None = None  # once made
    lost: str = ""  # why it can never be had again (its producer failed, or lost too often)
    reads: tuple[int, ...] = ()  # the objects its producer reads
    after: tuple[int, ...] = ()
    digest: str = ""  # its name for a journal (`result_name`), when there is one
    restored: bool = False  # known from a resumed run's journal, made nowhere yet: made on demand


_OWNERS = itertools.count(1)  # one per ObjectTable in this process: its pool's refs say which


class ObjectTable:
    """One pool's objects. Not thread-safe: the pool calls it from its event loop."""

    def __init__(self) -> None:
        self.owner = next(_OWNERS)  # stamped on this pool's refs (ObjectRef.pool)
        self._ids = itertools.count(1)
        self._values: dict[int, Any] = {}  # put values, filled fed values, relayed kept values
        self._nbytes: dict[int, int] = {}  # encoded size of each value's Put
        self._users: dict[int, int] = {}  # object id -> unresolved tasks that name it
        self._dropping: set[int] = set()  # dropped by the caller, kept until its users resolve
        self._held: dict[str, set[int]] = {}  # host -> object ids its agent holds
        self._kept: dict[int, KeptObject] = {}
        self._fed: dict[int, int] = {}  # task id -> the fed object that takes its value
        self.relayed_bytes = 0
        self.fetched_bytes = 0

    def put(self, value: Any) -> ObjectRef:
        """Keep `value`; raises UsageError if it could not travel as a kernel argument."""
        try:  # what cannot travel, in the words a task's arguments get (too much str or bytes: what to do)
            check_value(value, "pool.put", or_put=False)
        except LocalProtocolError as exc:
            raise UsageError(str(exc)) from None
        streams = OutgoingStreams()  # large arrays stream: a value of any size can be put
        streams.behind = DropBehind  # hashed, a memory-mapped file's pages are not kept mapped
        try:
            parts = encode_messages_parts((m.Put(object_id=0, value=value),), streams=streams)
        except LocalProtocolError as exc:
            if "exceeds the" in str(exc):  # the frame limit: say what to do about a put
                raise UsageError(f"pool.put: {str(exc).split(':')[0]}; put the value in parts") from None
            raise UsageError(f"pool.put: {exc}") from None
        digest = hashlib.sha256()  # with SHA extensions, twice blake2b's speed
        nbytes = 0
        # a memory-mapped array is read chunk by chunk here, never whole: each ask for chunks
        # drops what the last one gave (chunks.py's `behind`)
        for part in parts:
            digest.update(part)
            nbytes += memoryview(part).nbytes
        while streams.active:
            for part in streams.next_chunk_parts(streams.chunk_bytes):
                digest.update(part)
                nbytes += memoryview(part).nbytes
        streams.written()
        object_id = next(self._ids)
        self._values[object_id] = value
        self._nbytes[object_id] = nbytes
        self._users[object_id] = 0
        if isinstance(value, np.ndarray):  # described as a kept array is: shape, dtype and its bytes
            shape, dtype, size = tuple(int(n) for n in value.shape), value.dtype.str, int(value.nbytes)
        else:  # other values by their encoded size (what travels)
            shape, dtype, size = (), "", nbytes
        digest_text = digest.hexdigest()[:32]
        return ObjectRef(
            object_id,
            digest=digest_text,
            nbytes=size,
            size=_elements_of(value),
            shape=shape,
            dtype=dtype,
            pool=self.owner,
        )

    def check(self, ref: ObjectRef, where: str) -> None:
        """UsageError for a ref this pool did not make (its id names another value here), or
        for what is no ref at all."""
        if not isinstance(ref, ObjectRef):
            raise UsageError(f"{where} takes an ObjectRef (from pool.put or keep=True), not {type(ref).__name__}")
        if ref.pool == 0:
            raise UsageError(
                f"{where} names {ref!r}, which no pool made (made by hand, or read from a result); pass the ref "
                "that pool.put or a keep=True task gave"
            )
        if ref.pool != self.owner:
            raise UsageError(
                f"{where} names {ref!r}, a value of another pool (its id means another value in this one); "
                "pool.put the value in this pool, or pass the value itself"
            )

    # -- kept and fed objects ----------------------------------------------------------------

    def keep(
        self,
        task: Task,
        job: str,
        producer: TaskFuture,
        reads: tuple[int, ...],
        after: tuple[int, ...],
        digest: str = "",
    ) -> KeptObject:
        """A new kept object, made by `producer` running `task`."""
        object_id = next(self._ids)
        kept = self._kept[object_id] = KeptObject(
            object_id, task, job, producer, reads=reads, after=after, digest=digest
        )
        self._users[object_id] = 0
        return kept

    @property
    def in_use(self) -> bool:
        """Whether any kept or fed object exists (tasks may then read each other's values)."""
        return bool(self._kept or self._fed)

    def kept(self, object_id: int) -> KeptObject | None:
        return self._kept.get(object_id)

    def kept_made(self, object_id: int, host: str, ref: ObjectRef) -> None:
        """The producer succeeded on `host`, which holds the value now."""
        kept = self._kept.get(object_id)
        if kept is not None:
            kept.ref = ref
            kept.lost = ""
            self._held.setdefault(host, set()).add(object_id)

    def kept_lost(self, object_id: int, reason: str) -> None:
        kept = self._kept.get(object_id)
        if kept is not None:
            kept.lost = reason

    def fed_object(self, task_id: int) -> int:
        """The object that takes the value of unfinished task `task_id` for the tasks naming it."""
        object_id = self._fed.get(task_id)
        if object_id is None:
            object_id = self._fed[task_id] = next(self._ids)
            self._users[object_id] = 0
            self._dropping.add(object_id)  # forgotten with the last task that names it
        return object_id

    def task_finished(self, task_id: int, value: Any, succeeded: bool) -> None:
        """Fill the fed object of `task_id`, if a task names its value."""
        object_id = self._fed.pop(task_id, None)
        if object_id is not None and not self._users.get(object_id, 1):  # its readers were all restored
            self._forget([object_id])
        elif object_id is not None and succeeded and object_id in self._users:
            self._values[object_id] = value
            try:
                self._nbytes[object_id] = _nbytes_of(value)
            except LocalProtocolError:
                self._nbytes[object_id] = 0

    def holders(self, object_id: int) -> list[str]:
        return [host for host, held in self._held.items() if object_id in held]

    def cached(self, object_id: int) -> tuple[bool, Any]:
        """(True, value) when the coordinator holds the value itself."""
        if object_id in self._values:
            return True, self._values[object_id]
        return False, None

    def relayed(self, object_id: int, value: Any, nbytes: int) -> None:
        """A kept value fetched to move it to another host: kept here until dropped, so that
        it moves through the coordinator once, however many hosts need it."""
        if object_id in self._kept and object_id in self._users:
            self._values[object_id] = value
            self._nbytes[object_id] = nbytes
            self.relayed_bytes += nbytes

    # -- users -------------------------------------------------------------------------------

    def acquire(self, refs: Iterable[ObjectRef], task_name: str) -> tuple[int, ...]:
        """Count a task as a user of its refs; UsageError for a ref that is not (or no longer) here."""
        for ref in refs:
            self.check(ref, f"task {task_name!r}")
        ids = tuple(dict.fromkeys(ref.object_id for ref in refs))
        for object_id in ids:
            known = object_id in self._values or object_id in self._kept or object_id in self._users
            if not known or (object_id in self._dropping and object_id not in self._fed.values()):
                raise UsageError(
                    f"task {task_name!r} names object {object_id}, which this pool does not hold "
                    "(dropped, or put in another pool); pool.put it again"
                )
        for object_id in ids:
            self._users[object_id] += 1
        return ids

    def release(self, ids: tuple[int, ...]) -> tuple[dict[str, tuple[int, ...]], list[int]]:
        """A task that named `ids` resolved; returns the Drops now due, by host, and the ids forgotten."""
        done: list[int] = []
        for object_id in ids:
            if object_id not in self._users:
                continue
            self._users[object_id] -= 1
            if not self._users[object_id] and object_id in self._dropping:
                done.append(object_id)
        return self._forget(done), done

    def drop(self, ref: ObjectRef) -> tuple[dict[str, tuple[int, ...]], list[int]]:
        """Forget `ref` once no unresolved task names it; returns the Drops due now, by host,
        and the ids forgotten."""
        object_id = ref.object_id
        if object_id not in self._users:
            return {}, []
        if self._users[object_id]:
            self._dropping.add(object_id)
            return {}, []
        return self._forget([object_id]), [object_id]

    def puts_for(self, host: str, ids: tuple[int, ...]) -> tuple[list[tuple[m.Put, int]], list[int]]:
        """The Puts to send `host` before a task that names `ids` (those it does not hold yet),
        each with its size in bytes (for flow control), and the kept objects it lacks that
        the coordinator does not have either (to fetch from a host that holds them first)."""
        held = self._held.setdefault(host, set())
        puts: list[tuple[m.Put, int]] = []
        missing: list[int] = []
        for object_id in ids:
            if object_id in held:
                continue
            if object_id in self._values:
                puts.append((m.Put(object_id=object_id, value=self._values[object_id]), self._nbytes[object_id]))
                held.add(object_id)
            elif object_id in self._kept:
                missing.append(object_id)
        return puts, missing

    def slot_lost(self, host: str, object_ids: Iterable[int]) -> None:
        """`host` no longer holds these objects (the slot process holding them died)."""
        held = self._held.get(host)
        if held is not None:
            held.difference_update(object_ids)

    def host_reset(self, host: str) -> None:
        """`host` has a fresh agent, holding nothing."""
        self._held.pop(host, None)

    def stats(self) -> tuple[int, int]:
        """(objects held, of which dropped but still in use)."""
        return len(self._users), len(self._dropping)

    def _forget(self, ids: list[int]) -> dict[str, tuple[int, ...]]:
        for object_id in ids:
            self._values.pop(object_id, None)
            self._nbytes.pop(object_id, None)
            del self._users[object_id]
            self._kept.pop(object_id, None)
            self._dropping.discard(object_id)
        drops: dict[str, tuple[int, ...]] = {}
        for host, held in self._held.items():
            gone = tuple(i for i in ids if i in held)
            if gone:
                held.difference_update(gone)
                drops[host] = gone
        return drops
