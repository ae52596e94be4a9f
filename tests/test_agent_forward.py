"""Fetched values forwarded while they arrive (batuta/agent/forward.py, outbox.py), in-process.

A slot's pipe decoder tells its PipeWatch of a Put whose arrays are still coming and of each
chunk that fills them; the agent's outbox writes a Forwarded answer with the arrays still
growing marked for the data link, drops it once its source died or without a data link, and
never writes it as a half-filled array. The whole path over SSH hosts is in test_data_link.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batuta.agent.forward import Forwarded, PipeWatch
from batuta.agent.outbox import DoneBatch, outbox_messages
from batuta.core.task import Outcome
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import FrameDecoder, encode_messages_parts
from batuta.protocol.messages import Done, Heartbeat, Put, TaskOutcome
from batuta.transport.growing import Growing

CHUNK = 100


def _join(parts: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)


def _forwarded(growing: list[Growing], flats: list[np.ndarray]) -> Forwarded:
    outcome = TaskOutcome(task_id=9, slot=0, attempt=1, status=Outcome.OK, value=flats[0])
    return Forwarded(Done(results=(outcome,)), flats, growing)


def test_a_pipe_watch_forwards_a_put_it_is_offered_and_follows_each_chunk() -> None:
    sender = OutgoingStreams(stream_min_bytes=256, chunk_bytes=CHUNK)
    decoder = FrameDecoder()
    offered: list[tuple[int, Put, list[Growing]]] = []

    def arriving(slot: int, put: Put, flats: list[np.ndarray], growing: list[Growing]) -> bool:
        offered.append((slot, put, growing))
        return True

    watch = PipeWatch(3, decoder.streams, arriving)
    value = np.arange(100.0)  # 800 bytes: 8 chunks
    decoder.feed(_join(encode_messages_parts((Put(object_id=4, value=value),), streams=sender)))
    assert decoder.next_message() is None
    [(slot, put, [growing])] = offered
    assert slot == 3 and put.object_id == 4 and growing.filled == 0 and watch.growing == 1
    decoder.feed(_join(sender.next_chunk_parts(3 * CHUNK)))
    assert decoder.next_message() is None and growing.filled == 3 * CHUNK
    watch.abort()  # the process went: what it still owed never comes
    assert growing.aborted and watch.growing == 0
    done = Done(results=(TaskOutcome(task_id=1, slot=3, attempt=1, status=Outcome.OK, value=value),))
    decoder.feed(_join(encode_messages_parts((done,), streams=sender)))
    assert len(offered) == 1  # a task's result is not offered: it goes whole, as before


def test_the_outbox_marks_growing_arrays_and_never_writes_a_forwarded_value_it_must_not() -> None:
    flat = np.zeros(1000, dtype=np.uint8)
    growing, whole, dead = Growing(1000), Growing(1000), Growing(1000)
    growing.advance(400)
    whole.advance(1000)
    dead.advance(10)
    dead.abort()
    batch = DoneBatch()
    batch.results.append(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=1))
    beat = Heartbeat(seq=1, cpu_percent=1.0, memory_used=1, memory_total=2)
    outbox: list[Any] = [beat, _forwarded([growing], [flat]), batch, _forwarded([whole], [flat])]
    outbox.append(_forwarded([dead], [flat]))
    messages, marked = outbox_messages(outbox, forwarding=True)
    assert [type(m).__name__ for m in messages] == ["Heartbeat", "Done", "Done", "Done"]  # the dead one dropped
    assert isinstance(messages[1], Done)
    assert [task.task_id for task in messages[1].results] == [9]  # a Done of its own, not merged
    assert len(marked) == 1 and marked[0][1] is growing and marked[0][0] is flat  # the whole one goes as usual
    messages, marked = outbox_messages(outbox, forwarding=False)  # no data link: none of them goes
    assert [type(m).__name__ for m in messages] == ["Heartbeat", "Done"] and marked == []
