"""What one slot's current process holds of the agent's values, and the frames that send them.

The agent's store (`objects.py`) has put values and kept results; a slot process gets a put
value once, in a `Put` written just before the first `Run` that names it, and every later task
names it by id (as Dask keeps scattered data in the worker). This module keeps that record for
one slot (`SlotSupervisor` owns one per slot and starts it afresh with every process) and
encodes what goes down the pipe: Puts, Runs (arrays as chunks behind their frame, or as
references to the agent's shared memory), Drops. The rules it follows are the supervisor's
("Kept results", in `supervisor.py`'s docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from batuta.agent.objects import ObjectStore
from batuta.core.objects import refs_in
from batuta.core.task import KernelCall, Outcome
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import encode_message, encode_streamed_parts
from batuta.protocol.errors import LocalProtocolError
from batuta.protocol.messages import Drop, Put, Run, TaskRequest

Refuse = Callable[[TaskRequest, Outcome, str], None]
"""Answers a task that cannot be sent (its input gone, or it cannot be encoded) and forgets it."""


class SlotValues:
    """The values the slot's current process holds, and the encoding of what it is sent."""

    __slots__ = ("_locate", "_pinned", "_store", "_to_slot", "held")

    def __init__(self, store: ObjectStore, locate: Callable[[Any], bytes | None] | None) -> None:
        self._store = store  # the agent's
        self._locate = locate  # task arguments in the agent's shared memory go as references to it (shm.py)
        self.held: set[int] = set()  # ids the current process holds
        self._pinned: list[Any] = []  # Put values passed by reference, until the process has read them
        self._to_slot = OutgoingStreams()  # large arrays go down the pipe as chunks, right behind their frame

    def new_process(self) -> None:
        """A new process: it holds nothing yet, and its pipe numbers its streams from 0."""
        self._to_slot = OutgoingStreams()
        self.held = set()
        self._pinned = []

    def all_read(self) -> None:
        """Every frame written so far was read: pinned Put values are the store's again."""
        self._pinned.clear()

    def in_other_slot(self, request: TaskRequest) -> int | None:
        """An object `request` names that lives in another slot's process, if any."""
        call = request.call
        if not isinstance(call, KernelCall) or not call.args:
            return None
        for ref in refs_in(call.args):
            if ref.object_id not in self.held and self._store.slot_of(ref.object_id) is not None:
                return ref.object_id
        return None

    def wanted(self, batch: list[TaskRequest], fed: Iterable[TaskRequest], refuse: Refuse) -> list[tuple[int, Any]]:
        """The put objects `batch` names that the process lacks (to send as Puts), recorded as
        held from now on. A task whose object is no longer here (dropped while it waited,
        which the coordinator does not do) is refused and removed from `batch`."""
        wanted: list[tuple[int, Any]] = []
        ahead = {r.keep for r in fed if r.keep}  # kept by tasks the process runs first (fed ahead)
        for request in list(batch):
            call = request.call
            named = self._store and isinstance(call, KernelCall) and call.args  # (none here: refused at Run)
            if named and not self._add_refs(request, ahead, wanted, refuse):
                batch.remove(request)  # refused
                continue
            if request.keep:  # the process makes it (again) now: the tasks behind read that one
                ahead.add(request.keep)
                self.held.discard(request.keep)
        return wanted

    def _add_refs(self, request: TaskRequest, ahead: set[int], wanted: list[tuple[int, Any]], refuse: Refuse) -> bool:
        assert isinstance(request.call, KernelCall)
        for ref in refs_in(request.call.args):
            object_id = ref.object_id
            if object_id in self.held or object_id in ahead:
                continue  # the process holds it, or will once the task ahead making it ran
            if object_id not in self._store:
                if self._store.was_lost(object_id):  # the coordinator runs it again once remade
                    refuse(request, Outcome.CRASHED, f"input object {object_id} was lost with a slot's process")
                else:
                    refuse(request, Outcome.ERROR, f"object {object_id} is not on this host")
                return False
            wanted.append((object_id, self._store[object_id]))
            self.held.add(object_id)
        return True

    def put_parts(self, puts: list[tuple[int, Any]], *, shared: bool) -> list[Any]:
        """The Put frames for `puts`. With `shared` (they go just before a Run that names them),
        a value in the agent's shared memory goes as a reference the slot maps or reads
        (shm.py), not down the pipe: the value is pinned here until every task fed so far is
        answered, by which time the slot has read the Put (an object may be dropped or spilled
        meanwhile, and its mapping reused)."""
        parts: list[Any] = []
        locate = self._locate if shared else None
        for object_id, value in puts:
            parts += encode_streamed_parts(Put(object_id=object_id, value=value), self._to_slot, locate=locate)
            if locate is not None:
                self._pinned.append(value)
        return parts

    def run_parts(self, batch: list[TaskRequest], refuse: Refuse) -> list[Any]:
        """The Run frame(s) for `batch`. A batch too big for one frame goes as one frame per
        task; a task that cannot be re-encoded at all (it came in one frame, so this should not
        happen) is refused and removed from `batch`."""
        try:
            return encode_streamed_parts(Run(tasks=tuple(batch)), self._to_slot, locate=self._locate)
        except LocalProtocolError:
            pass
        parts: list[Any] = []
        for request in list(batch):
            try:
                parts += encode_streamed_parts(Run(tasks=(request,)), self._to_slot, locate=self._locate)
            except LocalProtocolError as exc:
                batch.remove(request)
                refuse(request, Outcome.ERROR, f"cannot pass the task to its slot: {exc}")
        return parts

    def drop_frame(self, object_ids: Iterable[int]) -> bytes | None:
        """The Drop for those of `object_ids` the process holds, now forgotten; None if none."""
        dropped = tuple(i for i in object_ids if i in self.held)
        if not dropped:
            return None
        self.held.difference_update(dropped)
        return encode_message(Drop(object_ids=dropped))
