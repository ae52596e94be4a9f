"""The coordinator's side of `pool.put`: values by id, which hosts hold which, who needs them.

A value goes to a host lazily, in the same write as (and just before) the first Run that
needs it there, so a put that no task uses costs nothing but coordinator memory, and a
host that joins later gets only what its tasks name. When a host's agent starts again
(relaunch after a loss), its store is empty: `host_reset` forgets what it held, and the
next task sent there carries the Put again.

`drop` is safe at any time: while unresolved tasks still name the object, the coordinator
keeps it (and the hosts keep their copies) until the last of them resolves.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from typing import Any

from batuta.core.backend import element_count
from batuta.core.objects import ObjectRef
from batuta.errors import UsageError
from batuta.protocol import messages as m
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import encode_messages_parts
from batuta.protocol.errors import LocalProtocolError


def _elements_of(value: Any) -> int:
    """Array elements in `value` as `Backend.AUTO` would count it passed directly: itself, or
    the items of a tuple or list."""
    return element_count(tuple(value) if isinstance(value, tuple | list) else (value,))


class ObjectTable:
    """One pool's put values. Not thread-safe: the pool calls it from its event loop."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._values: dict[int, Any] = {}
        self._nbytes: dict[int, int] = {}  # encoded size of each value's Put
        self._users: dict[int, int] = {}  # object id -> unresolved tasks that name it
        self._dropping: set[int] = set()  # dropped by the caller, kept until its users resolve
        self._held: dict[str, set[int]] = {}  # host -> object ids its agent holds

    def put(self, value: Any) -> ObjectRef:
        """Keep `value`; raises UsageError if it could not travel as a kernel argument."""
        streams = OutgoingStreams()  # large arrays stream: a value of any size can be put
        try:
            parts = encode_messages_parts((m.Put(object_id=0, value=value),), streams=streams)
        except LocalProtocolError as exc:
            if "exceeds the" in str(exc):  # the frame limit: say what to do about a put
                raise UsageError(f"pool.put: {str(exc).split(':')[0]}; put the value in parts") from None
            raise UsageError(f"pool.put: {exc}") from None
        digest = hashlib.sha256()  # with SHA extensions, twice blake2b's speed
        nbytes = 0
        # a memory-mapped array is read chunk by chunk here, never whole
        for part in (*parts, *streams.all_chunk_parts()):
            digest.update(part)
            nbytes += memoryview(part).nbytes
        object_id = next(self._ids)
        self._values[object_id] = value
        self._nbytes[object_id] = nbytes
        self._users[object_id] = 0
        return ObjectRef(object_id, digest=digest.hexdigest()[:32], nbytes=nbytes, size=_elements_of(value))

    def acquire(self, refs: Iterable[ObjectRef], task_name: str) -> tuple[int, ...]:
        """Count a task as a user of its refs; UsageError for a ref that is not (or no longer) here."""
        ids = tuple(dict.fromkeys(ref.object_id for ref in refs))
        for object_id in ids:
            if object_id not in self._values or object_id in self._dropping:
                raise UsageError(
                    f"task {task_name!r} names object {object_id}, which this pool does not hold "
                    "(dropped, or put in another pool); pool.put it again"
                )
        for object_id in ids:
            self._users[object_id] += 1
        return ids

    def release(self, ids: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """A task that named `ids` resolved; returns the Drops now due, by host."""
        done: list[int] = []
        for object_id in ids:
            self._users[object_id] -= 1
            if not self._users[object_id] and object_id in self._dropping:
                done.append(object_id)
        return self._forget(done)

    def drop(self, ref: ObjectRef) -> dict[str, tuple[int, ...]]:
        """Forget `ref` once no unresolved task names it; returns the Drops due now, by host."""
        object_id = ref.object_id
        if object_id not in self._values:
            return {}
        if self._users[object_id]:
            self._dropping.add(object_id)
            return {}
        return self._forget([object_id])

    def puts_for(self, host: str, ids: tuple[int, ...]) -> list[tuple[m.Put, int]]:
        """The Puts to send `host` before a task that names `ids` (those it does not hold yet),
        each with its size in bytes (for flow control)."""
        held = self._held.setdefault(host, set())
        puts = [(m.Put(object_id=i, value=self._values[i]), self._nbytes[i]) for i in ids if i not in held]
        held.update(put.object_id for put, _ in puts)
        return puts

    def host_reset(self, host: str) -> None:
        """`host` has a fresh agent, holding nothing."""
        self._held.pop(host, None)

    def stats(self) -> tuple[int, int]:
        """(objects held, of which dropped but still in use)."""
        return len(self._values), len(self._dropping)

    def _forget(self, ids: list[int]) -> dict[str, tuple[int, ...]]:
        for object_id in ids:
            del self._values[object_id]
            del self._nbytes[object_id]
            del self._users[object_id]
            self._dropping.discard(object_id)
        drops: dict[str, tuple[int, ...]] = {}
        for host, held in self._held.items():
            gone = tuple(i for i in ids if i in held)
            if gone:
                held.difference_update(gone)
                drops[host] = gone
        return drops
