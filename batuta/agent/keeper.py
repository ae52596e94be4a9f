"""Objects kept in slot processes, as the agent sees them: fetched, lent, lost with their slot.

A kept result stays in the slot process that made it (`objects.py`); this is the agent's side
of that (`SlotKeeper`, what the supervisors tell it): the Fetches of the coordinator for such
an object, answered from the slot's pipe (forwarded while they arrive, `forward.py`) or lent
by the slot when the data link sends (`lend.py`); objects a task on another slot of the host
needs, or the store spills, asked of their slot; and what a slot process's death loses. The
agent owns the loop, the outbox and the slots; this owns the asks in flight (`_Pull`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from batuta.agent.datalink import AgentDataLink
from batuta.agent.execute import print_error
from batuta.agent.forward import Forwarded, PipeWatch
from batuta.agent.lend import Lender, Lent
from batuta.agent.objects import ObjectStore, value_nbytes
from batuta.agent.supervisor import SlotSupervisor
from batuta.protocol.chunks import StreamAssembler
from batuta.protocol.messages import Done, Fetch, Message, ObjectsLost, Outcome, Put, TaskOutcome
from batuta.transport.growing import Growing

_ABSENT = object()  # a fetch answered "not here"


class _Pull:
    """An object's bytes asked of the slot that holds them, and the Fetches waiting for them."""

    __slots__ = ("forwarded", "lend", "local", "requests", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.requests: list[int] = []
        self.forwarded: list[int] = []  # requests answered while the value arrives (forward.py)
        self.local = False  # wanted here too (a task on another slot, a spill), not only fetched
        self.lend = False  # asked to lend it (lend.py), and not for its bytes as well


class Keeper:
    """The agent's `SlotKeeper` (see the module doc). Everything runs on the agent's loop."""

    def __init__(
        self,
        *,
        objects: ObjectStore,
        slots: dict[int, SlotSupervisor],
        data_link: AgentDataLink,
        host_name: str,
        emit: Callable[[Message], None],
        forward: Callable[[Forwarded], None],
        finished: Callable[[TaskOutcome], None],
        call_soon: Callable[..., Any],
        call_soon_threadsafe: Callable[..., Any],
    ) -> None:
        self._objects = objects
        self._slots = slots  # the agent's, filled as it spawns them
        self._data_link = data_link
        self._host_name = host_name
        self._emit = emit  # a message to the coordinator
        self._forward = forward  # a Fetch answered while its value arrives or is read
        self._finished = finished  # a Fetch answered: its outcome, as a task's
        self._call_soon = call_soon
        self._pulls: dict[int, _Pull] = {}  # object id -> its bytes asked of the slot holding it
        self.slot_object_bytes = 0  # kept bytes that crossed a slot's pipe to the agent (telemetry, tests)
        self.pipes: dict[int, PipeWatch] = {}  # slot -> its current process's pipe (forward.py)
        self._lender = Lender(call_soon_threadsafe, self._lend_refused, self._drop_in_slots)

    def drop(self, object_ids: tuple[int, ...]) -> None:
        """The agent forgot these objects: so do the slots (those being lent, once read)."""
        self._drop_in_slots(self._lender.drops(object_ids))

    def abort_pipes(self) -> None:
        """The slots are going: values still being forwarded never come whole now."""
        for pipe in self.pipes.values():
            pipe.abort()

    def _pull(self, object_id: int, request_id: int = 0, *, lend: bool = False) -> None:
        """Ask the slot holding `object_id` for its bytes, or to `lend` it (once, however many
        wait): for the coordinator's Fetch `request_id`, or (0) for this host's own use."""
        pull = self._pulls.get(object_id)
        if pull is None:
            slot_index = self._objects.slot_of(object_id)
            slot = self._slots.get(slot_index) if slot_index is not None else None
            pull = self._pulls[object_id] = _Pull(slot_index if slot_index is not None else -1)
            pull.lend = lend
            if slot is None or not slot.fetch_object(object_id, lend=lend):
                self._call_soon(self.object_arrived, pull.slot, object_id, None, False)
            elif lend:
                self._lender.asked(pull.slot, object_id)
        if request_id:
            pull.requests.append(request_id)
        else:
            pull.local = True
            if pull.lend and pull.slot in self._slots:  # what is lent feeds no slot: the bytes too
                pull.lend = False
                self._slots[pull.slot].fetch_object(object_id)

    def pipe_opened(self, slot: int, streams: StreamAssembler) -> None:
        """A slot's new process: watch its pipe for fetched values to forward as they arrive,
        and take the arrays it lends."""
        self.pipes[slot] = PipeWatch(slot, streams, self._arriving)
        self._lender.take(slot)  # what the last process lent and no frame claimed
        streams.shared = self._lender.arrays_hook(slot, lambda: self._slots[slot].pid)

    def _arriving(self, slot: int, put: Put, flats: list[np.ndarray], growing: list[Growing]) -> bool:
        """A slot's answer to a Fetch began to come: answer the Fetches now if the data link
        can send its arrays as they fill (forward.py). Whether it does."""
        pull = self._pulls.get(put.object_id)
        if pull is None or not pull.requests or pull.slot != slot or not self._data_link.forwards(flats):
            return False
        for request_id in pull.requests:
            outcome = TaskOutcome(task_id=request_id, slot=0, attempt=1, status=Outcome.OK, value=put.value)
            self._forward(Forwarded(Done(results=(outcome,)), flats, growing))
        pull.forwarded += pull.requests
        pull.requests = []
        return True

    def object_wanted(self, object_id: int) -> None:
        """A task on another slot names it: fetch it here, then feed that slot."""
        self._pull(object_id)

    def evict(self, object_id: int, slot: int) -> None:
        """The store is past its cap: fetch the object from its slot, to spill it."""
        self._pull(object_id)

    def object_arrived(self, slot: int, object_id: int, value: Any, present: bool) -> None:
        """A slot answered a fetch: the value now, or (not `present`) that it lacked it."""
        lent = self._lender.take(slot)
        if lent:
            self._lent(slot, object_id, value, lent)
            self._lender.answered(object_id)
            return
        self._lender.answered(object_id)
        pull = self._pulls.pop(object_id, None)
        if present:
            self.slot_object_bytes += self._objects.nbytes(object_id) or value_nbytes(value)
            if pull is None or pull.local:
                self._objects.settle(object_id, value)
            # else only fetched: the slot keeps it, and this host one copy, not two (the store
            # would count it once; a later get asks the slot again, as a Dask worker sends its own)
        elif self._objects.slot_of(object_id) == slot:  # it was not there: as good as lost
            self._objects.lose((object_id,))
            self._emit(ObjectsLost(object_ids=(object_id,), reason=f"slot {slot} no longer held it"))
        for request_id in pull.requests if pull is not None else ():
            self._answer_fetch(request_id, object_id, value if present else _ABSENT)
        for supervisor in self._slots.values():  # tasks held for it are fed (or answered) now
            supervisor.pump()

    def _lent(self, slot: int, object_id: int, value: Any, lent: list[tuple[np.ndarray, Lent]]) -> None:
        """The slot lent the value (lend.py): answer the Fetches now, the link reading its
        memory; if it cannot (the link stopped sending), ask for the bytes instead."""
        pull = self._pulls.get(object_id)
        placeholders = [placeholder for placeholder, _ in lent]
        if pull is None or not pull.requests or not self._data_link.forwards(placeholders):
            self._lender.release(lent)
            if pull is not None and pull.requests and pull.slot in self._slots:
                pull.lend = False
                self._slots[pull.slot].fetch_object(object_id)
            return
        self._lender.start(slot, object_id, pull.requests, lent)
        for request_id in pull.requests:
            outcome = TaskOutcome(task_id=request_id, slot=0, attempt=1, status=Outcome.OK, value=value)
            self._forward(Forwarded(Done(results=(outcome,)), placeholders, [source for _, source in lent]))
        pull.requests = []
        if pull.lend:  # nothing else comes for it
            del self._pulls[object_id]

    def _lend_refused(self, slot: int, object_id: int, requests: list[int]) -> None:
        print_error(
            f"batuta agent: reading slot {slot}'s memory was refused; kept values are fetched "
            "through its pipe from now on"
        )
        for request_id in requests:
            self._pull(object_id, request_id)

    def _drop_in_slots(self, object_ids: tuple[int, ...]) -> None:
        for slot in self._slots.values():
            slot.drop_objects(object_ids)

    def process_lost(self, slot: int, reason: str) -> None:
        """Slot `slot`'s process is going: the objects it alone held are lost. The
        coordinator hears it before any outcome that follows, and makes them again."""
        lost = self._objects.lose_slot(slot)
        if lost:
            self._emit(ObjectsLost(object_ids=lost, reason=reason))
        if slot in self.pipes:
            self.pipes.pop(slot).abort()  # what it was still sending never comes
        for object_id in [i for i, pull in self._pulls.items() if pull.slot == slot]:
            pull = self._pulls.pop(object_id)
            for request_id in pull.forwarded + pull.requests:  # forwarded ones again: aborted
                self._answer_fetch(request_id, object_id, _ABSENT)
        for object_id, requests in self._lender.slot_lost(slot):  # and lent ones
            for request_id in requests:
                self._answer_fetch(request_id, object_id, _ABSENT)
        if lost:  # tasks elsewhere held for them are answered now (not left waiting)
            self._call_soon(self._pump_all)

    def _pump_all(self) -> None:
        for supervisor in self._slots.values():
            supervisor.pump()

    def spilled(self, object_id: int) -> None:
        """An object went to disk: slot processes holding a copy drop it (the cap bounds them
        too); a slot that needs it again gets it from the store. One being lent, once read."""
        self._drop_in_slots(self._lender.drops((object_id,)))

    def fetch(self, fetch: Fetch) -> None:
        """Send an object back as the result of request `fetch.request_id` (see `Fetch`);
        one a slot holds is asked of that slot first: lent, if the data link sends (lend.py)."""
        object_id = fetch.object_id
        holder = self._objects.slot_of(object_id)
        if holder is not None:
            slot = self._slots.get(holder)
            cpu = slot is not None and "gpu" not in slot.info.capabilities
            self._pull(object_id, fetch.request_id, lend=cpu and self._lender.works and self._data_link.sending)
            return
        self._answer_fetch(fetch.request_id, object_id, self._objects.get(object_id, _ABSENT))

    def _answer_fetch(self, request_id: int, object_id: int, value: Any) -> None:
        if value is not _ABSENT:
            outcome = TaskOutcome(task_id=request_id, slot=0, attempt=1, status=Outcome.OK, value=value)
        else:
            outcome = TaskOutcome(
                task_id=request_id,
                slot=0,
                attempt=1,
                status=Outcome.ERROR,
                error=f"object {object_id} is not on host {self._host_name} (dropped, lost with a slot's "
                "process, or the agent restarted)",
            )
        self._finished(outcome)
