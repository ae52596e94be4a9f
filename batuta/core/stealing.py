"""Work stealing for the scheduler: taking from a victim's deque, and asking its agent for tasks back.

Two of the rules in `batuta.core.scheduler`'s docstring live here, as functions of the
scheduler whose state they move (they read and write its tables as friends of the class):

* `steal_from_deque`: a slot that found nothing in its own deque or the injector takes the
  oldest task it can run from the deque of a victim drawn with the scheduler's seeded RNG.
  Only the head of a deque is searched, so a steal stays O(1) whatever the deque's length;
  in a cluster of more than `SchedulerConfig.steal_probes` slots only that many random
  victims are looked at (rayon and crossbeam probe a few random victims too), so a steal
  stays O(1) whatever the number of slots as well. Victims are drawn from `SlotSample`s of
  the slots that may hold work, so probes rarely land on idle slots.
* `try_steal_back`, `on_steal_back_answered`, `end_steal_back`: a slot that found nothing
  at all asks a victim's agent to give back the newest half of the tasks in its window not
  known to have started, and the tasks move only when the agent answers.

They are apart from the scheduler so that its module holds the event handlers and the
filling of windows, and this one the victims, thieves and steal-back bookkeeping.
`steal_from_deque` is on the fill path: like the scheduler's own methods it is one call per
look, with no layer of its own in between.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from batuta.core import injector
from batuta.core.deps import may_steal
from batuta.core.events import RequestStealBack, StealBackAnswered
from batuta.core.feedahead import void_behind
from batuta.core.placement import Place, SlotRecord, SlotState, TaskEntry

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def steal_from_deque(scheduler: Scheduler, thief: SlotRecord) -> TaskEntry | None:
    """Take the oldest task `thief` can run from a random victim's deque, if any holds one
    (a task queued where its inputs are only from a long deque: `deps.may_steal`)."""
    caps = thief.capabilities
    slack = scheduler.config.locality_slack
    victim: SlotRecord | None = None
    probes = scheduler.config.steal_probes
    if len(scheduler._slots) <= probes:
        victims = [
            s
            for s in scheduler._slots.values()
            if s is not thief
            and s.deque
            and any(e.requires <= caps and may_steal(e, thief, len(s.deque), slack) for e in _head(s.deque))
        ]
        if not victims:
            return None
        victim = victims[scheduler._rng.randrange(len(victims))] if len(victims) > 1 else victims[0]
    else:
        holders = scheduler._deque_holders
        for _ in range(probes):
            if not holders:
                return None
            candidate = holders.draw(scheduler._rng)
            if not candidate.deque:
                holders.discard(candidate)  # emptied since it joined the sample
            elif candidate is not thief and any(
                e.requires <= caps and may_steal(e, thief, len(candidate.deque), slack) for e in _head(candidate.deque)
            ):
                victim = candidate
                break
        if victim is None:
            return None
    for i, entry in enumerate(_head(victim.deque)):
        if entry.requires <= caps and may_steal(entry, thief, len(victim.deque), slack):
            return _take(scheduler, victim, i, thief, f"stolen from {victim.slot_id} by {thief.slot_id}")
    return None  # unreachable: the victim was chosen for holding such an entry


def _take(scheduler: Scheduler, victim: SlotRecord, index: int, thief: SlotRecord, note: str) -> TaskEntry:
    """Move the task at `index` of `victim`'s deque to `thief`, counted as a steal."""
    entry = victim.deque[index]
    del victim.deque[index]
    scheduler._queued -= 1
    victim.steals_out += 1
    thief.steals_in += 1
    scheduler.stats.steals += 1
    scheduler._note(entry, note)
    return entry


def steal_more_urgent(scheduler: Scheduler, thief: SlotRecord, below: int) -> TaskEntry | None:
    """Take the most urgent task of priority over `below` that `thief` can run from the head
    of any deque: a slot whose own deque held LOW tasks ran them while another slot's deque
    held HIGH ones. Scans every deque holder, so the scheduler asks only while a task of
    higher priority may wait in one (`Scheduler._top_priority`), and lowers that mark when
    none does."""
    caps = thief.capabilities
    best: tuple[int, SlotRecord, int] | None = None  # (priority, victim, index): the first most urgent
    for victim in scheduler._deque_holders.members():
        if victim is thief or not victim.deque:
            continue
        for i, entry in enumerate(_head(victim.deque)):
            if entry.priority > below and entry.requires <= caps and (best is None or entry.priority > best[0]):
                best = (entry.priority, victim, i)
    if best is None:
        scheduler._top_priority = below
        return None
    _priority, victim, index = best
    return _take(scheduler, victim, index, thief, f"taken from {victim.slot_id} by {thief.slot_id}: more urgent")


def try_steal_back(scheduler: Scheduler, thief: SlotRecord) -> None:
    """Ask a random busy victim's agent for the newest half of its unstarted tasks."""
    chosen: tuple[SlotRecord, list[TaskEntry]] | None = None
    probes = scheduler.config.steal_probes
    if len(scheduler._slots) <= probes:
        candidates: list[tuple[SlotRecord, list[TaskEntry]]] = []
        for victim in scheduler._slots.values():
            if victim is not thief and victim.state is not SlotState.LOST:
                stealable = _stealable(victim, thief)
                if stealable is not None:
                    candidates.append((victim, stealable))
        if not candidates:
            return
        chosen = candidates[scheduler._rng.randrange(len(candidates))]
    else:
        holders = scheduler._window_holders
        for _ in range(probes):
            if not holders:
                return
            victim = holders.draw(scheduler._rng)
            if _stealable(victim, None) is None:
                # nothing any thief could take: out of the sample until `_fill` sends it more
                # (the only way a window gains stealable tasks), so idle thieves stop finding it
                holders.discard(victim)
            elif victim is not thief and victim.state is not SlotState.LOST:
                stealable = _stealable(victim, thief)
                if stealable is not None:
                    chosen = (victim, stealable)
                    break
        if chosen is None:
            return
    victim, stealable = chosen
    take = stealable[len(stealable) // 2 :]  # the newest half, at least one
    take = take[: thief.window_limit]
    for entry in take:
        entry.steal_pending = True
        scheduler._steal_thief[entry.task_id] = thief
    thief.steal_backs_pending += len(take)
    scheduler.stats.steal_backs_requested += len(take)
    scheduler._out.append(RequestStealBack(slot_id=victim.slot_id, task_ids=tuple(e.task_id for e in take)))


def recall_unstarted(scheduler: Scheduler, victim: SlotRecord) -> None:
    """Ask `victim`'s agent back for every task in its window not known to have started (a
    pause: nothing new may start); what it returns goes to the injector, to wait there for the
    resume. Tasks fed ahead of inputs still to be made stay (they start only after those)."""
    take = [
        e for e in victim.window.values() if not e.started and not e.resolved and not e.steal_pending and not e.unmet
    ]
    if not take:
        return
    for entry in take:
        entry.steal_pending = True
        scheduler._steal_thief[entry.task_id] = None  # no thief: back to the injector
    scheduler.stats.steal_backs_requested += len(take)
    scheduler._out.append(RequestStealBack(slot_id=victim.slot_id, task_ids=tuple(e.task_id for e in take)))


def _stealable(victim: SlotRecord, thief: SlotRecord | None) -> list[TaskEntry] | None:
    """The tasks `thief` (None: any thief) may ask back from `victim`'s window, oldest first,
    or None if asking would not help. A window holds at most `max_window` tasks, so this is
    bounded. A task sent to the host where its inputs are stays there (`home`); one fed ahead of
    its inputs (`feedahead.py`) stays until they are made."""
    if not victim.window:
        return None
    stealable = [
        e
        for e in victim.window.values()
        if not e.started
        and not e.resolved
        and not e.steal_pending
        and not e.steal_refused
        and not e.unmet  # fed ahead of inputs still to be made there: it could run nowhere sooner
        and (thief is None or (e.requires <= thief.capabilities and may_steal(e, thief, 0, 0)))
    ]
    if len(stealable) != 1:
        return stealable or None
    # An idle victim would start its only task itself; taking it just moves the wait. (Tasks fed
    # ahead behind it wait for it, and keep no one busy.)
    behind = sum(1 for e in victim.window.values() if e.unmet and not e.started and not e.resolved)
    return stealable if 1 + behind < len(victim.window) else None


def on_steal_back_answered(scheduler: Scheduler, ev: StealBackAnswered) -> None:
    """Move what the agent gave back to its thief (or the injector); keep what it refused."""
    victim = scheduler._slots.get(ev.slot_id)
    for task_id in ev.refused:
        entry = scheduler._tasks.get(task_id)
        if entry is not None and entry.steal_pending and entry.slot is victim:
            thief = end_steal_back(scheduler, entry)
            entry.steal_refused = True
            scheduler.stats.steal_backs_refused += 1
            if thief is not None:
                scheduler._refill(thief)
    for task_id in ev.returned:
        entry = scheduler._tasks.get(task_id)
        if entry is None or not entry.steal_pending or entry.slot is not victim:
            continue  # the victim was lost meanwhile and the task already moved on
        assert victim is not None
        thief = end_steal_back(scheduler, entry)
        del victim.window[task_id]
        entry.attempts -= 1  # it never started
        entry.slot = None
        scheduler.stats.steal_backs_returned += 1
        if entry.resolved:  # cancelled while the steal was in flight
            entry.place = Place.GONE
            del scheduler._tasks[task_id]
            continue
        entry.steal_refused = True  # moved once by steal-back this attempt; never bounce it
        if entry.keep_as:  # what it was to make there for the tasks fed ahead behind it (feedahead.py)
            void_behind(scheduler, victim, entry)
        suspected = thief is not None and thief.host_id in scheduler._suspected  # went silent meanwhile
        if thief is not None and thief.state is SlotState.UP and entry.requires <= thief.capabilities and not suspected:
            victim.steals_out += 1
            thief.steals_in += 1
            scheduler._push_deque_front(thief, entry)
            scheduler._note(entry, f"stolen back from {victim.slot_id} by {thief.slot_id}")
            scheduler._fill(thief)
        else:
            klass = scheduler._class_of(entry.requires)
            injector.push(scheduler, entry, klass)
            scheduler._feed_hungry(klass)
    if victim is not None:
        scheduler._refill(victim)


def end_steal_back(scheduler: Scheduler, entry: TaskEntry) -> SlotRecord | None:
    """The steal-back of `entry` is over (answered, finished or lost): release its thief."""
    entry.steal_pending = False
    thief = scheduler._steal_thief.pop(entry.task_id, None)
    if thief is not None:
        thief.steal_backs_pending -= 1
    return thief


def _head(queue: deque[TaskEntry], limit: int = 16) -> list[TaskEntry]:
    """The oldest few entries of a deque (thieves look no further, to stay O(1))."""
    return [queue[i] for i in range(min(limit, len(queue)))]
