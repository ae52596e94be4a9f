"""A host that fails tasks for a reason of its own (core/hostfit.py), event by event.

The agent of such a host answers each task it cannot run "unfit" at once (a put value it
could not allocate, code it could not write), so it used to draw more and more of the work
and fail it task by task while the other hosts could have run it all.
"""

from __future__ import annotations

from dataclasses import replace

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Outcome, TaskStatus
from tests.scheduler_sim import Sim

WHY = "host bad could not hold put value 1 in memory: 8 bytes; run it on a host with more free memory"


def cluster(*hosts: tuple[str, tuple[str, ...]], slots: int = 2) -> Sim:
    sim = Sim(Scheduler(SchedulerConfig(initial_window=2, story_length=1000)))
    for host, caps in hosts:
        for index in range(slots):
            sim.add_slot(f"{host}/{index}", host_id=host, caps=caps)
    return sim


def refuse_all(sim: Sim, host: str) -> int:
    """`host`'s agent answers every task it holds "unfit", as the agent does, without starting it."""
    refused = 0
    for slot in sim.slots.values():
        if slot.host_id != host or not slot.up:
            continue
        while slot.queue:
            task_id, attempt = slot.queue.pop(0)
            slot.outbox.append(
                ev.TaskOutcomeReported(
                    task_id=task_id, slot_id=slot.slot_id, attempt=attempt, outcome=Outcome.UNFIT, reason=WHY
                )
            )
            refused += 1
        sim.deliver(slot.slot_id)
    return refused


def settle(sim: Sim, bad: str) -> int:
    """Run everything: `bad` refuses what it gets, the others run it; returns the refusals."""
    refused = 0
    for _ in range(1000):
        refused += refuse_all(sim, bad)
        before = len(sim.resolved)
        sim.run_to_completion()
        if len(sim.resolved) == before and not any(s.queue for s in sim.slots.values() if s.host_id == bad):
            return refused
    raise AssertionError("did not settle")


def announced(sim: Sim) -> list[ev.AnnounceUnfit]:
    return [i for i in sim.instructions if isinstance(i, ev.AnnounceUnfit)]


def test_a_host_that_refuses_a_task_gets_no_more_work_and_the_task_runs_elsewhere_unpenalised() -> None:
    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)))
    ids = [sim.submit(max_attempts=1) for _ in range(20)]
    refused = settle(sim, "bad")
    sim.assert_each_resolved_once()
    assert {sim.status_of(t) for t in ids} == {TaskStatus.SUCCEEDED}
    assert {sim.resolved[t][0].slot_id.split("/")[0] for t in ids} == {"good"}  # type: ignore[union-attr]
    assert {sim.resolved[t][0].attempts for t in ids} == {1}  # a refusal is no attempt: max_attempts=1 was enough
    assert refused <= 4  # what bad held when it first refused (2 slots, windows of 2), then nothing
    assert [(a.host_id, a.reason, a.lifted) for a in announced(sim)] == [("bad", WHY, False)]
    assert {v.state for v in sim.sched.slots() if v.host_id == "bad"} == {"draining"}
    sim.sched.validate()


def test_a_refusal_with_no_other_host_to_run_the_task_fails_it_with_the_hosts_reason() -> None:
    sim = cluster(("bad", ("cpu",)))
    first = sim.submit()
    refuse_all(sim, "bad")
    assert sim.status_of(first) is TaskStatus.FAILED
    assert sim.resolved[first][0].reason == WHY
    assert announced(sim) == []  # not marked: it goes on running what it can
    second = sim.submit()
    sim.run_to_completion()
    assert sim.status_of(second) is TaskStatus.SUCCEEDED


def test_a_host_offering_what_no_other_does_is_not_marked_and_its_refusals_are_bounded() -> None:
    sim = cluster(("bad", ("cpu", "gpu")), ("good", ("cpu",)), slots=1)
    gpu = sim.submit(requires=("gpu",))
    cpu = [sim.submit(max_attempts=1) for _ in range(6)]
    settle(sim, "bad")
    sim.assert_each_resolved_once()
    assert sim.status_of(gpu) is TaskStatus.FAILED and sim.resolved[gpu][0].reason == WHY
    assert announced(sim) == []  # it alone runs GPU work: kept
    for task_id in cpu:  # refused by bad, run by good, or failed after max_attempts + 2 refusals
        assert sim.status_of(task_id) in (TaskStatus.SUCCEEDED, TaskStatus.FAILED)
    assert any(sim.resolved[t][0].slot_id == "good/0" for t in cpu)
    sim.sched.validate()


def test_an_unfit_host_stays_unfit_through_a_relaunch_says_so_again_and_the_undrain_lifts_it() -> None:
    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)), slots=1)
    sim.submit()
    refuse_all(sim, "bad")
    assert len(announced(sim)) == 1
    sim.lose_host("bad", reason="agent killed")
    sim.rejoin("bad/0")
    assert [a.host_id for a in announced(sim)] == ["bad", "bad"]  # said again: it was "up" meanwhile
    ids = [sim.submit() for _ in range(4)]
    sim.run_to_completion()
    assert {sim.resolved[t][0].slot_id for t in ids} == {"good/0"}
    sim.handle(ev.HostDrainRequested(host_id="bad", undo=True))
    more = [sim.submit() for _ in range(4)]
    sim.run_to_completion()
    assert "bad/0" in {sim.resolved[t][0].slot_id for t in more}
    sim.sched.validate()


def test_an_unfit_host_takes_work_again_once_no_other_host_can() -> None:
    """The host that could run everything it can was retired: the tasks waiting would have
    waited for ever behind a mark that no longer keeps them from anything."""
    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)), slots=1)
    sim.submit()
    refuse_all(sim, "bad")
    sim.run_to_completion()
    waiting = [sim.submit() for _ in range(3)]
    sim.lose_host("good")
    sim.handle(ev.HostLost(host_id="good", reason="allocation ended", retired=True))
    assert announced(sim)[-1].lifted and announced(sim)[-1].host_id == "bad"
    sim.run_to_completion()
    assert {sim.resolved[t][0].slot_id for t in waiting} == {"bad/0"}
    sim.sched.validate()


def test_an_unfit_host_is_unfit_in_pool_hosts_and_stays_unfit_when_heard_from_again() -> None:
    """`Pool.hosts()` said "up" (its liveness) for a host the events said "unfit", and a host
    suspected for a silence was said "up" when heard from again, while it still got no work."""
    from batuta.runtime.inbound import host_views, still_held
    from batuta.runtime.views import HostView

    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)))
    for _ in range(8):
        sim.submit()
    settle(sim, "bad")
    views = [
        HostView(name=name, state="up", description="", slots=2, gpus=(), cpu_count=2, last_heard_s=0.0)
        for name in ("bad", "good")
    ]
    assert [(v.name, v.state) for v in host_views(views, sim.sched)] == [("bad", "unfit"), ("good", "up")]
    gone = [replace(view, state="lost") for view in views]
    assert [v.state for v in host_views(gone, sim.sched)] == ["lost", "lost"]  # its liveness first
    state, reason = still_held(sim.sched, "bad", "up", "heard from again")
    assert state == "unfit" and reason.startswith(WHY) and "heard from again, still unfit" in reason
    assert still_held(sim.sched, "good", "up", "heard from again") == ("up", "heard from again")
    assert still_held(sim.sched, "bad", "suspected", "silent") == ("suspected", "silent")


def test_a_drained_host_heard_from_again_is_said_drained_not_up_and_drain_comes_before_unfit() -> None:
    """A drained host suspected for a silence was said "up" when heard from again, and
    `Pool.hosts()` said "up" for it all along."""
    from batuta.runtime.inbound import host_views, still_held
    from batuta.runtime.views import HostView

    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)))
    for _ in range(8):
        sim.submit()
    settle(sim, "bad")  # bad is unfit
    sim.handle(ev.HostDrainRequested(host_id="good"))
    sim.handle(ev.HostDrainRequested(host_id="bad"))
    views = [
        HostView(name=name, state="up", description="", slots=2, gpus=(), cpu_count=2, last_heard_s=0.0)
        for name in ("bad", "good")
    ]
    assert [v.state for v in host_views(views, sim.sched)] == ["drained", "drained"]
    state, reason = still_held(sim.sched, "good", "up", "heard from again")
    assert (state, reason) == (
        "drained",
        "heard from again, still drained: it gets no new work (undo: Pool.drain(host, undo=True))",
    )
    sim.handle(ev.HostDrainRequested(host_id="bad", undo=True))  # the undo lifts the unfit mark as well
    assert [v.state for v in host_views(views, sim.sched)] == ["up", "drained"]


def test_a_lifted_mark_is_announced_as_what_the_host_is_now_not_as_unfit() -> None:
    """The lift was announced as state "unfit" ("given work again") while `Pool.hosts()`
    said "up": the log and the dashboard showed a host taking work as unfit."""
    from batuta.runtime.inbound import announce_host, host_views, still_held
    from batuta.runtime.views import HostView

    said: list[tuple[str, str, str]] = []

    class Observed:  # the two things announce_host asks of the pool
        _scheduler = None

        def host_state_changed(self, host: str, state: str, reason: str) -> None:
            said.append((host, *still_held(sim.sched, host, state, reason)))

    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)), slots=1)
    sim.submit()
    refuse_all(sim, "bad")
    sim.lose_host("good")
    sim.handle(ev.HostLost(host_id="good", reason="allocation ended", retired=True))
    pool = Observed()
    pool._scheduler = sim.sched  # type: ignore[assignment]
    for lifted in [a for a in announced(sim) if a.lifted]:
        announce_host(pool, lifted)  # type: ignore[arg-type]
    assert [(host, state) for host, state, _ in said] == [("bad", "up")]
    assert said[0][2] == f"no longer unfit ({WHY}): it is given work again, as no other host can run what waits"
    view = HostView(name="bad", state="up", description="", slots=1, gpus=(), cpu_count=1, last_heard_s=0.0)
    assert [v.state for v in host_views([view], sim.sched)] == ["up"]


def refuse_and_run_one_at_a_time(sim: Sim, bad: set[str], tasks: int) -> None:
    """Hosts in `bad` refuse whatever they hold, the others run one task per step, until
    `tasks` tasks are resolved: the kept host's idle slot steals from a deep deque meanwhile."""
    for _ in range(10_000):
        for host in bad:
            refuse_all(sim, host)
        for slot_id, slot in sim.slots.items():
            sim.answer_steals(slot_id)
            if slot.host_id not in bad:
                sim.deliver(slot_id)
                if slot.running is not None:
                    sim.finish(slot_id)
                else:
                    sim.start(slot_id)
                sim.deliver(slot_id)
        if len(sim.resolved) == tasks:
            return
    raise AssertionError("did not settle")


def test_a_task_refused_by_a_kept_host_stays_off_it_and_runs_elsewhere_not_lost_as_a_host_gone_down() -> None:
    """The only GPU host refused CPU tasks (a put too big for it) and was kept, as it alone runs
    GPU work: its idle slot stole each refused task back from the deep queue of the host that
    could run it, and after 3 refusals the task was LOST as "its host went down 3 times ... the
    task itself may be what brings the host down", while the host had never gone down."""
    sim = cluster(("gpu", ("cpu", "gpu")), ("cpu", ("cpu",)), slots=1)
    gpu = sim.submit(requires=("gpu",))
    cpu = [sim.submit(max_attempts=1) for _ in range(12)]
    refuse_and_run_one_at_a_time(sim, {"gpu"}, 13)
    sim.assert_each_resolved_once()
    assert sim.status_of(gpu) is TaskStatus.FAILED and sim.resolved[gpu][0].reason == WHY
    assert [(sim.status_of(t), sim.resolved[t][0].slot_id) for t in cpu] == [(TaskStatus.SUCCEEDED, "cpu/0")] * 12
    assert {sim.resolved[t][0].attempts for t in cpu} == {1}
    assert announced(sim) == []  # still not marked: it alone runs GPU work
    sim.sched.validate()


def test_a_task_every_capable_host_refuses_fails_with_the_hosts_reason_after_a_bounded_number() -> None:
    """Two hosts each alone offering something (a GPU, a tag) both refuse a CPU task: neither
    is marked, and the task would go from one to the other for ever."""
    sim = cluster(("gpu", ("cpu", "gpu")), ("tagged", ("cpu", "tag")), slots=1)
    task = sim.submit(max_attempts=1)
    refuse_and_run_one_at_a_time(sim, {"gpu", "tagged"}, 1)
    result = sim.resolved[task][0]
    assert result.status is TaskStatus.FAILED
    assert result.reason is not None and result.reason.startswith(WHY)
    assert result.reason.endswith(
        "(given back 3 times before it started, the last by host gpu; max_attempts=1 allows 3)"
    ) or (
        result.reason.endswith(
            "(given back 3 times before it started, the last by host tagged; max_attempts=1 allows 3)"
        )
    )
    sim.sched.validate()


def test_draining_the_only_other_host_lifts_an_unfit_mark_and_the_waiting_work_runs() -> None:
    """A host drained by request was still counted fit: with the only other host drained, the
    unfit host kept its mark and the queued work waited for ever."""
    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)), slots=1)
    sim.submit()
    refuse_all(sim, "bad")
    sim.run_to_completion()
    assert [(a.host_id, a.lifted) for a in announced(sim)] == [("bad", False)]
    sim.handle(ev.HostDrainRequested(host_id="good"))
    waiting = [sim.submit() for _ in range(3)]
    sim.run_to_completion()
    assert [(a.host_id, a.lifted) for a in announced(sim)] == [("bad", False), ("bad", True)]
    assert {sim.status_of(t) for t in waiting} == {TaskStatus.SUCCEEDED}
    assert {sim.resolved[t][0].slot_id for t in waiting} == {"bad/0"}
    sim.sched.validate()


def test_a_refusal_with_every_other_host_drained_fails_the_task_with_the_hosts_reason() -> None:
    """Drained first, then refused: the drained host counted as somewhere else to run it, the
    refusing host was marked unfit, and the task waited for ever on a host that takes no work."""
    sim = cluster(("bad", ("cpu",)), ("good", ("cpu",)), slots=1)
    sim.handle(ev.HostDrainRequested(host_id="good"))
    task = sim.submit()
    refuse_all(sim, "bad")
    sim.run_to_completion()
    assert sim.status_of(task) is TaskStatus.FAILED
    assert sim.resolved[task][0].reason == WHY
    assert announced(sim) == []  # not marked: it goes on running what it can
    after = sim.submit()
    sim.run_to_completion()
    assert sim.status_of(after) is TaskStatus.SUCCEEDED and sim.resolved[after][0].slot_id == "bad/0"
    sim.sched.validate()
