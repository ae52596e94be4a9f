"""Suspected hosts in the scheduler core (`batuta.core.suspicion`), event by event.

A host silent past `suspect_after` is not lost yet, but whatever is sent to it waits out its
silence and is lost with it: it gets only the work that no host up and heard from can run.
The same on real hosts: tests/test_chaos.py::test_a_retry_goes_to_a_host_heard_from_not_to_a_suspected_one.
"""

from __future__ import annotations

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import TaskStatus
from tests.scheduler_sim import Sim


def sim_of(*hosts: tuple[str, tuple[str, ...]]) -> Sim:
    """One slot ("<host>/0") per host, windows of one task, no tail rule: placements are exact."""
    sim = Sim(Scheduler(SchedulerConfig(initial_window=1, min_window=1, tail_tasks_per_slot=0, story_length=100)))
    for host, caps in hosts:
        sim.add_slot(f"{host}/0", host_id=host, caps=caps)
    return sim


def queued_at(sim: Sim, slot_id: str) -> list[int]:
    slot = sim.slots[slot_id]
    return [t for t, _ in slot.queue] + ([slot.running[0]] if slot.running else [])


def test_a_retry_waits_for_a_host_heard_from_rather_than_go_to_an_idle_suspected_one() -> None:
    sim = sim_of(("a", ("cpu",)), ("c", ("cpu",)))
    first, second = sim.submit(), sim.submit()
    assert (queued_at(sim, "a/0"), queued_at(sim, "c/0")) == ([first], [second])
    sim.start("a/0")
    sim.start("c/0")
    sim.deliver("a/0")
    sim.deliver("c/0")
    sim.add_slot("b/0", host_id="b")  # idle: the least busy host
    sim.handle(ev.HostSuspected(host_id="b"))
    sim.lose_host("a")  # `first` had started there: a retry
    assert queued_at(sim, "b/0") == [], "the retry went to the suspected host"
    assert sim.sched.where(first) == ("deque", "c/0")
    sim.handle(ev.HostSuspected(host_id="b", heard_again=True))
    assert queued_at(sim, "b/0") == []  # queued at c for it: c takes it when it frees
    sim.sched.validate()
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    [result] = sim.resolved[first]
    assert (result.status, result.slot_id, result.attempts) == (TaskStatus.SUCCEEDED, "c/0", 2)


def test_a_suspected_host_gets_only_the_work_no_host_heard_from_can_run() -> None:
    sim = sim_of(("a", ("cpu",)), ("g", ("cpu", "gpu")))
    sim.handle(ev.HostSuspected(host_id="g"))
    cpu = [sim.submit() for _ in range(3)]
    assert queued_at(sim, "g/0") == [] and queued_at(sim, "a/0") == [cpu[0]]
    gpu = sim.submit(requires=("gpu",))  # only g can run it: it goes there, silent or not
    assert queued_at(sim, "g/0") == [gpu] and sim.sched.where(cpu[1]) == ("injector", None)
    sim.handle(ev.HostSuspected(host_id="g", heard_again=True))  # (the runtime says so before what it heard)
    sim.start("g/0")
    sim.finish("g/0")
    sim.deliver("g/0")
    assert cpu[1] in queued_at(sim, "g/0")  # heard from, it takes cpu work again
    sim.sched.validate()
    sim.run_to_completion()
    sim.assert_each_resolved_once()


def test_an_idle_suspected_slot_asks_no_agent_for_work_back() -> None:
    sim = Sim(Scheduler(SchedulerConfig(initial_window=3, min_window=3, tail_tasks_per_slot=0)))
    sim.add_slot("a/0", host_id="a")
    sim.add_slot("b/0", host_id="b")
    sim.handle(ev.HostSuspected(host_id="b"))
    tasks = [sim.submit() for _ in range(3)]
    assert queued_at(sim, "a/0") == tasks and queued_at(sim, "b/0") == []
    assert not [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)], "stolen back for a silent host"
    sim.handle(ev.HostSuspected(host_id="b", heard_again=True))  # now it may
    assert [i.slot_id for i in sim.instructions if isinstance(i, ev.RequestStealBack)] == ["a/0"]


def test_a_lost_suspected_host_is_heard_from_when_it_joins_again() -> None:
    sim = sim_of(("a", ("cpu",)), ("b", ("cpu",)))
    sim.handle(ev.HostSuspected(host_id="b"))
    sim.lose_host("b", reason="no heartbeat")
    sim.rejoin("b/0")
    tasks = [sim.submit() for _ in range(2)]
    assert queued_at(sim, "a/0") == [tasks[0]] and queued_at(sim, "b/0") == [tasks[1]]
