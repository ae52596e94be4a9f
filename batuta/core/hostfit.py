"""Hosts unfit for work: a task that failed because of its host, not because of itself.

An agent answers a task "unfit" (`Outcome.UNFIT`) when the host cannot run it whatever the
task does: a `put` value or an argument it could not allocate (out of memory), or the user's
code it could not write into its cache (a full disk). Such an answer comes back at once, so a
host failing this way drew ever more of the work (work stealing feeds the idle slots) and
failed it task by task while other hosts could have run it all.

So a refused task goes back to the queue free (the attempt is not counted) and to another
host first (`recovery.requeue(elsewhere=True)`), and its host is marked *unfit*, with the
agent's reason: its slots take no new work (held as a drain holds them; what waits in their
deques goes back to the queue) and the runtime tells observers (`AnnounceUnfit`: the log,
the dashboard, `batuta run --json`, whose `--strict` fails the run for it). The mark holds
through relaunches (the same memory, the same disk) until `Pool.drain(host, undo=True)`.

A host is marked only while everything it can run, another host fit for work can run as
well (`_replaceable`): a refused task with no other host to go to fails with the agent's
reason, which names the fix, and its host goes on running the rest. A host that offers
something no other does (its GPU, a tag) is not marked either: a task it refuses goes
elsewhere and stays off it (`TaskEntry.refused_on`: its slots do not steal it back, which
had them draw it again and again until it was lost as "its host went down 3 times"), and
should it come back there all the same (from the queue) it fails after `max_attempts + 2`
refusals with the host's reason, so that a task every other host lacks the means for still
ends. And when the hosts that made an unfit host replaceable are gone (retired) or drained by
request, its mark is lifted (`review`): it runs what waits again. A drained host is no host
fit for work: a task refused with only drained hosts left to run it fails with the reason.

The mark is per host, not per kind of work: a `put` value too big for a host keeps all work
off it, even tasks that never read that value. Keeping only the value's readers off it would
take the scheduler knowing which value an "unfit" answer was about (the agent says it in
words alone) and every placement skipping that value's readers for that host: the queue a
slot takes from is one heap per capability class, shared by all hosts, so a skip there is a
scan. `refused_on` keeps each refused task off the host, but its idle slots would still draw
every other reader once, and refuse it, for a whole map's length. So a value too big for a
host is treated as the host's lack (as its memory is), which `Pool.drain(host, undo=True)`
lifts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batuta.core import recovery
from batuta.core.events import AnnounceUnfit, HostId
from batuta.core.placement import SlotRecord, SlotState, TaskEntry
from batuta.core.task import TaskStatus

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def refused(s: Scheduler, entry: TaskEntry, slot: SlotRecord, reason: str) -> None:
    """`slot`'s host answered `entry` "unfit" (`reason`, the agent's, names host and fix)."""
    host = slot.host_id
    if not _elsewhere(s, entry.requires, host):
        s._resolve(entry, TaskStatus.FAILED, reason, slot_id=slot.slot_id)
        return
    entry.attempts -= 1  # the host's failure, not an attempt of the task
    why = f"host {host} cannot run it: {reason}"
    if host not in s._unfit:
        if _replaceable(s, host):
            mark(s, host, reason)
        else:  # kept for what only it offers (module docstring); this task stays off it
            entry.refused_on = host
            if _refused_too_often(s, entry, slot, reason):
                return
            why += " (not marked unfit: it alone offers some of what its slots do; this task stays off it)"
    recovery.requeue(s, entry, slot, why, elsewhere=True)


def _refused_too_often(s: Scheduler, entry: TaskEntry, slot: SlotRecord, reason: str) -> bool:
    """Fail, with the host's reason, a task refused again and again by hosts kept for what
    only they offer (or lost before it started as often): it would bounce for ever."""
    entry.unstarted_losses += 1
    allowed = entry.max_attempts + recovery.UNSTARTED_LOSSES_OVER_ATTEMPTS
    if entry.unstarted_losses < allowed:
        return False
    why = (
        f"{reason} (given back {entry.unstarted_losses} times before it started, the last by host "
        f"{slot.host_id}; max_attempts={entry.max_attempts} allows {allowed})"
    )
    s._resolve(entry, TaskStatus.FAILED, why, slot_id=slot.slot_id)
    return True


def mark(s: Scheduler, host: HostId, reason: str) -> None:
    """`host` takes no new work (module docstring); observers are told why."""
    s._unfit[host] = reason
    s.hold_host(host)
    s._capability_epoch += 1
    s._out.append(AnnounceUnfit(host_id=host, reason=reason))
    for other in s._hungry.snapshot():
        s._fill(other)


def rejoined(s: Scheduler, host: HostId) -> None:
    """A slot of an unfit host joined again (a relaunch): said again, once per return."""
    if host not in s._unfit_announced:
        s._unfit_announced.add(host)
        s._out.append(AnnounceUnfit(host_id=host, reason=s._unfit[host]))


def forget(s: Scheduler, host: HostId) -> None:
    """The mark goes (`Pool.drain(host, undo=True)`); the caller brings the slots back up."""
    s._unfit.pop(host, None)
    s._unfit_announced.discard(host)


def review(s: Scheduler) -> None:
    """After a loss or a drain: lift the mark of each unfit host that is no longer replaceable."""
    for host in list(s._unfit):
        if not _replaceable(s, host):
            reason = s._unfit.pop(host)
            s._unfit_announced.discard(host)
            s._out.append(AnnounceUnfit(host_id=host, reason=reason, lifted=True))
            if host not in s._draining:
                s.release_host(host, fill=False)  # the loss's own pass feeds them (recovery.py)
                s._capability_epoch += 1


def _fit_offers(s: Scheduler, other_than: HostId) -> list[frozenset[str]]:
    """What the slots of hosts fit for work, but `other_than`, offer (or will, once back up:
    lost slots and the hosts expected count; retired ones do not, nor hosts drained by request,
    which take no work until the user says so: counted, they kept an unfit host's mark while
    the queue waited for ever). A scan: refusals are rare."""
    unfit, drained = s._unfit, s._draining
    offers = [
        slot.capabilities
        for slot in s._slots.values()
        if slot.host_id != other_than
        and slot.host_id not in unfit
        and slot.host_id not in drained
        and slot.state is not SlotState.RETIRED
    ]
    for host, capabilities in s._expected.items():
        if host != other_than and host not in unfit and host not in drained:
            offers.extend(capabilities)
    return offers


def _elsewhere(s: Scheduler, requires: frozenset[str], host: HostId) -> bool:
    """Whether a host fit for work, other than `host`, can run a task requiring `requires`."""
    return any(requires <= offered for offered in _fit_offers(s, host))


def _replaceable(s: Scheduler, host: HostId) -> bool:
    """Whether whatever `host`'s slots can run, another host fit for work can run too."""
    offers = _fit_offers(s, host)
    return all(
        any(slot.capabilities <= offered for offered in offers)
        for slot in s._host_slots.get(host, ())
        if slot.state is not SlotState.RETIRED
    )
