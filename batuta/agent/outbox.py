"""What the agent writes in one pass of its loop: results merged into few Done frames.

Outgoing messages collect during one pass (`agent.py`): plain messages, runs of consecutive
results (`DoneBatch`, merged into as few Done frames as `DONE_MAX_RESULTS` and
`DONE_MAX_BYTES` allow) and fetched values forwarded while they arrive (`forward.py`), each
a Done of its own so that the coordinator can forget it alone if its source dies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from batuta.agent.forward import Forwarded
from batuta.protocol.connection import Connection
from batuta.protocol.errors import LocalProtocolError
from batuta.protocol.messages import Done, Message, Outcome, TaskOutcome
from batuta.transport.growing import Growing

# A report sent the moment a slot finishes wakes the coordinator on the core of that slot, on
# a host whose cores are all busy: Linux runs a process woken through a pipe on the writer's
# core, so the agent, then the coordinator, then the agent again (the next Run) ran there
# before the slot's next task could start. Seen with `perf sched` on 2 cores: 200-300 us
# between two tasks of a slot (a shared queue's: 60-90). A report that waits this long goes
# out while the slots compute, with the results of other slots finished meanwhile; alternated
# on ci-2core, the median time between two tasks of a slot fell from 310-336 to 144-187 us and
# imbalance.py went from 1.055/1.060 to 1.042/1.044 (lognormal) and 1.073/1.084 to 1.061/1.062
# (growing cost); trivial tasks a second did not change. Dask's workers batch what they tell
# the scheduler likewise (every 2 ms). Only a slot with more work in hand than
# `WAIT_IF_BUSY_FOR_S` lets its result wait: one that would run dry before the coordinator's
# answer came (trivial tasks fed in dozens) must be heard at once. And only on a host with
# no core to spare (agent.py): with one, the work runs there, and waiting only delays it.
REPORT_DELAY_S = 0.0005
WAIT_IF_BUSY_FOR_S = 2 * REPORT_DELAY_S
DONE_MAX_RESULTS = 1024  # results per Done frame
DONE_MAX_BYTES = 32 * 1024 * 1024  # estimated payload per Done frame, well under the frame limit


def outcome_size(outcome: TaskOutcome) -> int:
    """A rough size of an outcome on the wire, to keep Done frames from growing unbounded."""
    size = 64 + len(outcome.stdout) + len(outcome.stderr) + len(outcome.error or "")
    value = outcome.value
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        size += nbytes
    elif isinstance(value, (bytes, str)):
        size += len(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            item_bytes = getattr(item, "nbytes", None)
            size += item_bytes if isinstance(item_bytes, int) else 16
    return size


class DoneBatch:
    """Consecutive results waiting to go out, merged into as few Done frames as allowed."""

    __slots__ = ("results",)

    def __init__(self) -> None:
        self.results: list[TaskOutcome] = []

    def frames(self) -> list[Done]:
        frames: list[Done] = []
        chunk: list[TaskOutcome] = []
        size = 0
        for outcome in self.results:
            item = outcome_size(outcome)
            if chunk and (len(chunk) >= DONE_MAX_RESULTS or size + item > DONE_MAX_BYTES):
                frames.append(Done(results=tuple(chunk)))
                chunk, size = [], 0
            chunk.append(outcome)
            size += item
        if chunk:
            frames.append(Done(results=tuple(chunk)))
        return frames


Item = Message | DoneBatch | Forwarded


class Flusher:
    """When the agent writes its outbox: at the end of this loop pass (`soon()`), or within
    `delay_s` for reports that may wait for others to join them (`soon(wait=True)`: a result
    of a slot with work in hand for `WAIT_IF_BUSY_FOR_S`, a Started); whatever may not wait
    takes those along. `flush` must call `began()` first."""

    def __init__(self, flush: Callable[[], None], delay_s: float = REPORT_DELAY_S) -> None:
        self._flush = flush
        self.delay_s = delay_s
        self._now = False  # a flush is queued for the end of this pass
        self._timer: asyncio.TimerHandle | None = None  # one that may wait
        self._stopped = False

    @property
    def planned(self) -> bool:
        return self._now or self._timer is not None

    def soon(self, loop: asyncio.AbstractEventLoop, *, wait: bool = False) -> None:
        if self._now or self._stopped:
            return
        if wait:
            if self._timer is None:
                self._timer = loop.call_later(self.delay_s, self._flush)
            return
        self._cancel_timer()
        self._now = True
        loop.call_soon(self._flush)

    def began(self) -> None:
        """The flush runs now: what was planned is done by it."""
        self._now = False
        self._cancel_timer()

    def stop(self) -> None:
        """No more flushes (the agent writes its last words itself)."""
        self._stopped = True
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def outbox_messages(outbox: list[Item], *, forwarding: bool) -> tuple[list[Message], list[tuple[np.ndarray, Growing]]]:
    """The messages to write for `outbox`, and the arrays among them still growing (the data
    link must send those piece by piece). Forwarded values go only while `forwarding` (the
    data link sends: a channel's chunks cannot take half a value back) and only while their
    source lives; one dropped here is answered again by whoever aborted it."""
    messages: list[Message] = []
    growing: list[tuple[np.ndarray, Growing]] = []
    for item in outbox:
        if isinstance(item, DoneBatch):
            messages.extend(item.frames())
        elif isinstance(item, Forwarded):
            if forwarding and item.sendable:
                messages.append(item.done)
                growing += item.still_growing
        else:
            messages.append(item)
    return messages, growing


def encode_one_by_one(
    conn: Connection, messages: list[Message], *, fail: Callable[..., None], warn: Callable[[str], None]
) -> bytes | None:
    """The slow path after a batch failed to encode: send what can be sent, turn a result
    that cannot be encoded into an "error" outcome (slots check theirs, so this is a
    last line of defence), and stop (`fail`) only if the connection itself refuses."""
    chunks: list[bytes] = []
    for message in messages:
        try:
            chunks.append(conn.send(message))
            continue
        except LocalProtocolError as exc:
            if not conn.can_send:
                fail(f"agent bug: {exc}", send_error=False)
                return None
            problem = str(exc)
        if not isinstance(message, Done):
            warn(f"dropped an unsendable {type(message).__name__}: {problem}")
            continue
        for outcome in message.results:
            try:
                chunks.append(conn.send(Done(results=(outcome,))))
            except LocalProtocolError as exc:
                replacement = TaskOutcome(
                    task_id=outcome.task_id,
                    slot=outcome.slot,
                    attempt=outcome.attempt,
                    status=Outcome.ERROR,
                    error=f"the task's outcome cannot be sent to the coordinator: {exc}"[:500],
                    run_s=outcome.run_s,
                )
                chunks.append(conn.send(Done(results=(replacement,))))
    return b"".join(chunks)
