"""Feed-ahead: a dependent sent to the slot making its inputs before they are made.

A task that reads kept results waits (`deps.py`) until their producers' results reach the
coordinator, and only then is it sent, usually to the slot that made them. For a chain of
short tasks on kept values that costs one round trip per stage (slot -> agent -> coordinator
-> agent -> slot), longer than the stages themselves on a GPU. So when a waiting task's only
missing inputs are kept results of tasks already in one slot's window (sent there, not
answered), it is sent to that slot at once, behind them, as long as the slot can run it and
has room in its window. The slot runs its tasks in the order they were sent, so by the time
it runs the dependent, the values are in its process (a GPU slot's on its card) exactly as
if they had been made long before. The rules:

* Which. A waiting task whose unmet inputs are all kept objects (no `after` upstream: those
  values come back through the coordinator) whose producers sit, unanswered and not being
  stolen back, in the window of one up slot that can run it, and whose own inputs are on
  that slot's host or made there (a producer whose Run the runtime holds while it relays an
  input would be overtaken by its dependent). It is fed when it starts waiting, when a
  producer enters a window (`follow`), recursively down a chain, and when the window holding
  its producers gains room (`follow_window`): a chain longer than the window flows through it.
* Room. A dependent that is the only reader of every input it waits for (a stage of a chain)
  may fill the window up to `max_window`, past the limit sized for the round trip: it can
  run nowhere else sooner, so committing it costs no balance, and a chain of short GPU
  stages then queues on the card without a round trip per window's worth. Readers that
  share an input (a fan-out) keep to the window's limit, so that the others wait for the
  value and spread over the cluster.
* In the window. The dependent counts its producers' results still to come in `unmet`, as
  while it waited; it stays among their objects' readers, so their ends reach it. It is not
  stolen back while its inputs are still to come (it could run nowhere sooner); a producer
  still is, as any task (an idle slot elsewhere takes it), and the dependents behind it are
  then void (below) and follow it. `SendTasks.made_ahead` names the objects made there, so
  that the runtime does not try to send or fetch them.
* A producer succeeds: the dependent's `unmet` drops; at zero it is a task like any other.
* A producer fails, is cancelled or times out: the dependent resolves as if it had waited
  (`deps.py`: FAILED or CANCELLED, naming the producer) and stays in its window as a zombie
  until its agent answers for it. The agent answers by itself when the value was never made
  there (the slot finds no such object); a producer resolved here while still at its agent
  (a cancel, a backstop timeout) may still make it, so the dependent is aborted then.
* A producer's attempt there ends without a result (its worker crashed: it is requeued; or
  a steal-back took it to another slot): the dependents behind it are *void*, their attempt
  there cannot have its input. Whatever the agent reports for a void attempt, or for any dependent whose inputs
  are still to come, is not its result (`retract`): the dependent goes back to waiting (or,
  if its inputs are all there by now, to a queue), its attempt not counted unless it started,
  and is fed ahead again behind the producers' next runs. (One answered while its producers
  were still running there, which an agent does only if it refused the task, just waits.)
* Its slot is lost: like any task in the window (`recovery.py`); requeued, it waits for its
  inputs again, and may be fed ahead once more behind their producers' next attempts.

Exactly once holds as everywhere: each dependent is resolved once, and reports for an
attempt it no longer has are dropped. `SchedulerStats.fed_ahead` counts the dependents fed
ahead, `fed_ahead_returned` those that came back unrun.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batuta.core import deps
from batuta.core.deps import ObjectState
from batuta.core.placement import Place, SlotRecord, SlotState, TaskEntry

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def follow(s: Scheduler, slot: SlotRecord, producer: TaskEntry) -> None:
    """`producer` was just sent to `slot`: feed ahead the waiting readers of what it keeps."""
    record = s._deps.objects.get(producer.keep_as)
    if record is None or record.producer != producer.task_id:
        return
    for reader in list(record.readers):
        if len(slot.window) >= s.config.max_window:
            return
        if reader.place is Place.WAITING and not reader.resolved:
            try_feed(s, reader)


def follow_window(s: Scheduler, slot: SlotRecord) -> None:
    """`slot`'s window has room: feed ahead the waiting readers of what its tasks make."""
    for producer in list(slot.window.values()):
        if len(slot.window) >= s.config.max_window:
            return
        if producer.keep_as and not producer.resolved:
            follow(s, slot, producer)


def try_feed(s: Scheduler, entry: TaskEntry) -> bool:
    """Send waiting `entry` behind the producers of its missing inputs, if the rules allow."""
    if s._paused or s._shut_down or not s.config.feed_ahead or not entry.reads:
        return False
    objects, tasks = s._deps.objects, s._tasks
    slot: SlotRecord | None = None
    pending: list[int] = []
    producers: list[TaskEntry] = []
    for object_id in entry.reads:
        record = objects.get(object_id)
        if record is None or record.state is not ObjectState.PENDING:
            continue  # there already (or a put value): the runtime sends it, as for any task
        producer = tasks.get(record.producer)
        if (
            producer is None
            or producer.resolved
            or producer.place is not Place.WINDOW
            or producer.steal_pending
            or producer.slot is None
            or (slot is not None and producer.slot is not slot)
        ):
            return False
        slot = producer.slot
        pending.append(object_id)
        producers.append(producer)
    if (
        slot is None
        or len(pending) != entry.unmet  # it also waits for an upstream's value (`after`)
        or slot.state is not SlotState.UP
        or len(slot.window) >= _room(s, slot, pending)
        or not entry.requires <= slot.capabilities
        or not all(_inputs_there(s, producer, slot) for producer in producers)
    ):
        return False
    _feed(s, slot, entry, pending, producers)
    return True


def _room(s: Scheduler, slot: SlotRecord, pending: list[int]) -> int:
    """How full `slot`'s window may be for a dependent waiting for `pending` there (see Room)."""
    objects = s._deps.objects
    if all(len(objects[object_id].readers) == 1 for object_id in pending):
        return s.config.max_window  # a chain's stage: nobody else waits for these values
    return slot.window_limit


def _inputs_there(s: Scheduler, producer: TaskEntry, slot: SlotRecord) -> bool:
    """Whether every kept input of `producer` is on `slot`'s host or made on `slot` itself, so
    that its Run goes out at once (an input on another host is relayed first, and the Run
    held meanwhile: its dependent, sent behind it, would reach the host before it)."""
    for object_id in producer.reads:
        record = s._deps.objects.get(object_id)
        if record is None:
            continue
        if record.state is ObjectState.READY and record.host == slot.host_id:
            continue
        if record.state is ObjectState.PENDING and producer.unmet and not producer.void:
            continue  # fed ahead itself, behind its own producers on this slot
        return False
    return True


def _feed(s: Scheduler, slot: SlotRecord, entry: TaskEntry, pending: list[int], producers: list[TaskEntry]) -> None:
    del s._deps.waiting[entry.task_id]
    entry.place = Place.WINDOW
    entry.slot = slot
    entry.home = slot.host_id  # its inputs will be there: no thief elsewhere takes it
    entry.attempts += 1
    entry.started = False
    entry.void = False
    entry.tail = False  # it could run nowhere sooner: nothing to keep stealable
    slot.window[entry.task_id] = entry
    s._sends.setdefault(slot.slot_id, []).append(entry)
    s._made_ahead.setdefault(slot.slot_id, set()).update(pending)
    s.stats.fed_ahead += 1
    s._window_holders.add(slot)
    if len(slot.window) >= slot.window_limit:
        s._hungry.discard(slot)
    s._note(entry, f"fed ahead to {slot.slot_id}, behind task(s) {', '.join(str(p.task_id) for p in producers)}")
    if entry.keep_as and s._deps.waiting:
        follow(s, slot, entry)


def void_behind(s: Scheduler, slot: SlotRecord, producer: TaskEntry) -> None:
    """`producer`'s attempt on `slot` ended without making its object: the dependents fed
    ahead behind it there will not find it, so what they report is not their result."""
    object_id = producer.keep_as
    for entry in slot.window.values():
        if entry.unmet and not entry.resolved and object_id in entry.reads:
            entry.void = True
            s._note(entry, f"void on {slot.slot_id}: task {producer.task_id} ahead of it made nothing there")


def retract(s: Scheduler, entry: TaskEntry, slot: SlotRecord) -> None:
    """An attempt of a fed-ahead task that could not have its inputs reported back (already
    out of its window): back to waiting, or to a queue if its inputs are all there now."""
    s.stats.fed_ahead_returned += 1
    if not entry.started:
        entry.attempts -= 1  # it never ran: as a task returned by a steal-back
    void, entry.void = entry.void, False
    s._note(entry, f"back from {slot.slot_id} unrun: its inputs never got there")
    if entry.keep_as:
        void_behind(s, slot, entry)  # what it was to make for the tasks behind it was not made
    if deps.park_if_unready(s, entry):
        # behind its producers' next runs; one answered before its producers had ended there
        # (an agent that refused it) waits for their results as any dependent, not to bounce
        if void and entry.place is Place.WAITING:
            try_feed(s, entry)
        return
    deps.place_ready(s, entry)
