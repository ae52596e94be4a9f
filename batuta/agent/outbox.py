"""What the agent writes in one pass of its loop: results merged into few Done frames.

Outgoing messages collect during one pass (`agent.py`): plain messages, runs of consecutive
results (`DoneBatch`, merged into as few Done frames as `DONE_MAX_RESULTS` and
`DONE_MAX_BYTES` allow) and fetched values forwarded while they arrive (`forward.py`), each
a Done of its own so that the coordinator can forget it alone if its source dies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batuta.agent.forward import Forwarded
from batuta.protocol.connection import Connection
from batuta.protocol.errors import LocalProtocolError
from batuta.protocol.messages import Done, Message, Outcome, TaskOutcome
from batuta.transport.growing import Growing

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
