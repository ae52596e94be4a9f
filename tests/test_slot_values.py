"""`SlotValues`: what a slot's process holds of the agent's values, and what is sent to it.

Pure: an `ObjectStore` in memory, frames decoded back with the real decoder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from batuta.agent.objects import ObjectStore
from batuta.agent.slot_values import SlotValues
from batuta.core.objects import ObjectRef
from batuta.core.task import KernelCall, Outcome
from batuta.protocol.codec import FrameDecoder
from batuta.protocol.messages import Drop, Message, Put, Run, TaskRequest


def request(task_id: int, *object_ids: int, keep: int = 0) -> TaskRequest:
    args = tuple(ObjectRef(i) for i in object_ids)
    return TaskRequest(task_id=task_id, slot=0, attempt=1, call=KernelCall(name="noop", args=args), keep=keep)


def decode(parts: list[Any]) -> list[Message]:
    decoder = FrameDecoder()
    decoder.feed(b"".join(bytes(memoryview(part).cast("B")) for part in parts))
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    return messages


class Refused:
    def __init__(self) -> None:
        self.answers: list[tuple[int, Outcome, str]] = []

    def __call__(self, request: TaskRequest, status: Outcome, error: str) -> None:
        self.answers.append((request.task_id, status, error))


def store_with(*object_ids: int) -> ObjectStore:
    store = ObjectStore(1 << 30, Path())
    for object_id in object_ids:
        store.put(object_id, np.full(4, float(object_id)))
    return store


def test_each_value_is_put_once_then_named_by_id() -> None:
    values, refused = SlotValues(store_with(1, 2), locate=None), Refused()
    batch = [request(10, 1), request(11, 1, 2)]
    puts = values.wanted(batch, fed=(), refuse=refused)
    assert [object_id for object_id, _ in puts] == [1, 2]
    messages = decode(values.put_parts(puts, shared=True) + values.run_parts(batch, refused))
    assert [type(m) for m in messages] == [Put, Put, Run]
    first = messages[0]
    assert isinstance(first, Put) and np.array_equal(first.value, np.full(4, 1.0))
    assert values.wanted([request(12, 1, 2)], fed=(), refuse=refused) == []  # the process holds both now
    assert not refused.answers


def test_a_value_kept_by_a_task_ahead_is_not_sent() -> None:
    values, refused = SlotValues(store_with(), locate=None), Refused()
    assert values.wanted([request(2, 7)], fed=[request(1, keep=7)], refuse=refused) == []
    assert values.wanted([request(3, keep=8), request(4, 8)], fed=(), refuse=refused) == []
    assert not refused.answers


def test_a_task_whose_value_is_gone_is_refused_and_taken_out_of_the_batch() -> None:
    store = store_with(1, 5)
    store.lose((5,))
    values, refused = SlotValues(store, locate=None), Refused()
    batch = [request(10, 3), request(11, 5), request(12, 1)]
    puts = values.wanted(batch, fed=(), refuse=refused)
    assert [r.task_id for r in batch] == [12] and [object_id for object_id, _ in puts] == [1]
    assert refused.answers == [
        (10, Outcome.ERROR, "object 3 is not on this host"),
        (11, Outcome.CRASHED, "input object 5 was lost with a slot's process"),  # run again once remade
    ]


def test_drops_name_only_what_the_process_holds_and_a_new_process_holds_nothing() -> None:
    values, refused = SlotValues(store_with(1, 2), locate=None), Refused()
    values.wanted([request(10, 1, 2)], fed=(), refuse=refused)
    frame = values.drop_frame([2, 9])
    assert frame is not None
    assert decode([frame]) == [Drop(object_ids=(2,))]
    assert values.drop_frame([2, 9]) is None  # forgotten already
    values.new_process()
    assert values.drop_frame([1]) is None
    assert [object_id for object_id, _ in values.wanted([request(11, 1)], fed=(), refuse=refused)] == [1]


def test_another_slots_value_is_reported_until_this_process_holds_it() -> None:
    store = store_with()
    store.keep_in_slot(4, slot=1, nbytes=32)
    values = SlotValues(store, locate=None)
    assert values.in_other_slot(request(10, 4)) == 4
    assert values.in_other_slot(request(11)) is None
    values.held.add(4)
    assert values.in_other_slot(request(10, 4)) is None


def test_a_kept_value_the_slot_cannot_encode_is_answered_as_not_held(capfd: Any) -> None:
    """The slot's last guard (values are checked when kept, so none seen reaches it): a Fetch
    of a value whose encoding fails is a Drop (the pool makes it again) and a line on stderr,
    not the end of the slot and of every value it holds."""
    from batuta.agent.slot import SlotWorker

    frames_in, unused_out = os.pipe()
    results_in, frames_out = os.pipe()
    try:
        worker = SlotWorker(slot=3, frames_in=frames_in, frames_out=frames_out, kernel_modules=())
        worker._objects[5] = object()  # msgpack has no encoding for it
        worker._objects[6] = np.arange(4.0)
        worker._send_object(5)
        worker._send_object(6)
        os.set_blocking(results_in, False)
        sent = decode([os.read(results_in, 1 << 16)])
    finally:
        for fd in (frames_in, unused_out, results_in, frames_out):
            os.close(fd)
    assert sent[0] == Drop(object_ids=(5,))
    assert isinstance(sent[1], Put) and sent[1].object_id == 6 and np.array_equal(sent[1].value, np.arange(4.0))
    assert 5 not in worker._objects and 6 in worker._objects
    assert "slot 3: cannot send object 5: " in capfd.readouterr().err


def test_a_result_over_the_frame_limit_is_not_told_to_use_pool_put(monkeypatch: Any) -> None:
    """A kernel that returned 300 MiB of bytes failed with the submitter's advice, "or pool.put
    it once", which a kernel on a host cannot follow: what it can do is return an array."""
    import batuta.protocol._values as values
    from batuta.agent.slot import SlotWorker, _unsendable
    from batuta.protocol.messages import TaskOutcome

    monkeypatch.setattr(values, "MAX_INBAND_BYTES", 4096)
    outcome = TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=b"x" * 5000)
    sent = _unsendable(outcome, ValueError("frame too large"))
    frames_in, frames_out = os.pipe()
    try:
        worker = SlotWorker(slot=0, frames_in=frames_in, frames_out=frames_out, kernel_modules=())
        kept = worker._keep(9, outcome)
    finally:
        os.close(frames_in)
        os.close(frames_out)
    assert kept.status is Outcome.ERROR and 9 not in worker._objects
    for error in (sent, kept.error or ""):
        assert "the value it returned: about 0 MiB of str, bytes" in error, error
        assert "send bulk data as numpy arrays" in error and "pool.put" not in error, error
