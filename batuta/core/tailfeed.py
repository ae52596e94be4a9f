"""Tail tasks: sent behind a running task near the end, kept unfed by the agent so they stay stealable.

The tail rule (`SchedulerConfig.tail_tasks_per_slot`, in `scheduler.py`) sends nothing behind
a running task once few tasks wait. But the tasks sent behind running ones just *before* it
took effect are already committed: an agent feeds a short task to the slot process behind the
running one (`agent/supervisor.py`'s depth), and no steal-back reaches a fed task. When the
last tasks are long, one slot then runs its fed task after a long one while the others idle,
which a shared queue never does.

So while fewer than `SchedulerConfig.tail_unfed_tasks_per_slot` tasks per up slot of the same
kind (`task.slot_kind`: capabilities less a GPU slot's own "gpu:N") wait here (injector and
deques), a task sent to a slot that already holds one, whose tasks take at least a round trip
to its host (`sent_as_tail`), is a *tail* task
(`SendTasks.tail`, `TaskRequest.tail` on the wire): its agent keeps it in its own queue until
the slot process has nothing else fed, so a steal-back from an idle slot can still take it.
Only these last few sends pay the hand-off from agent to slot process between tasks that the
feed-ahead otherwise hides; every task before them is fed as usual, and so is every task of
a slot whose tasks are shorter than a round trip (no steal-back could run one sooner, and a
stream of them kept near the threshold would pay a hand-off each). Until a slot's run time
is known its agent feeds one task at a time anyway.

The flag is advice to the agent, not state the scheduler relies on: a task is placed, stolen
back and resolved exactly as any other whether its agent honours it or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batuta.core.placement import SlotRecord

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def in_tail(s: Scheduler, slot: SlotRecord) -> bool:
    """The tail rule: fewer tasks wait (injector and deques) than `tail_tasks_per_slot` for each
    up slot of this one's kind, and there is another such slot to give them to. Counted by
    kind, so that a lone GPU slot in a CPU cluster keeps its window full of GPU work, and the
    GPU slots of a host, each with its own "gpu:N", are alike: counted by capabilities, each
    was lone, and four GPU tasks on four idle GPUs went into the first GPU slot's window, to
    run one after another there."""
    per_slot = s.config.tail_tasks_per_slot
    alike = s._up_by_kind.get(slot.kind, 0)
    return per_slot > 0 and alike > 1 and s._queued < per_slot * alike


def sent_as_tail(s: Scheduler, slot: SlotRecord) -> bool:
    """Whether a task sent now to `slot`, behind one it holds, is a tail task (see above):
    few tasks wait per up slot like this one, there is another such slot to take it, and the
    slot's tasks take at least a round trip to its host (a steal-back costs one: for shorter
    tasks it could not end sooner than the slot runs it, while the hand-offs would cost)."""
    per_slot = s.config.tail_unfed_tasks_per_slot
    alike = s._up_by_kind.get(slot.kind, 0)
    if per_slot <= 0 or alike < 2 or s._queued >= per_slot * alike or slot.mean_run_s is None:
        return False
    return slot.mean_run_s >= s._round_trip.get(slot.host_id, s.config.default_round_trip)
