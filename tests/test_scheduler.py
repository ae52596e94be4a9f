"""The scheduler core, event by event, without an event loop."""

from __future__ import annotations

from dataclasses import replace

import pytest

from batuta.core import events as ev
from batuta.core.scheduler import InvariantViolation, Scheduler, SchedulerConfig, SchedulerError
from batuta.core.task import Outcome, TaskStatus
from batuta.errors import BatutaError
from tests.scheduler_sim import Sim


def sends(instructions: list[ev.Instruction]) -> list[ev.SendTasks]:
    return [i for i in instructions if isinstance(i, ev.SendTasks)]


def sim_with(*slots: str, config: SchedulerConfig | None = None, seed: int = 0) -> Sim:
    sim = Sim(Scheduler(config or SchedulerConfig(story_length=1000), seed=seed))
    for slot_id in slots:
        sim.add_slot(slot_id)
    return sim


def test_submissions_fill_windows_round_robin_then_queue() -> None:
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))  # windows, not the tail
    ids = [sim.submit() for _ in range(6)]
    assert [t for t, _ in sim.slots["a"].queue] == [ids[0], ids[2]]
    assert [t for t, _ in sim.slots["b"].queue] == [ids[1], ids[3]]
    assert sim.sched.queued == 2
    sim.sched.validate()


def test_the_last_tasks_wait_for_whichever_slot_frees_first() -> None:
    """The tail (fewer than `tail_tasks_per_slot` queued per slot): a slot holding a task is
    sent no more, so the last tasks go where a shared queue would send them, not behind a
    running task that may be long (issue 17, bench/imbalance.py)."""
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=4))
    ids = [sim.submit() for _ in range(3)]
    assert [t for t, _ in sim.slots["a"].queue] == [ids[0]]
    assert [t for t, _ in sim.slots["b"].queue] == [ids[1]]
    assert sim.sched.queued == 1  # ids[2] waits here, committed to neither
    for slot_id in ("a", "b"):
        sim.start(slot_id)
        sim.deliver(slot_id)
    sim.finish("b")  # b frees first: the last task is b's, though a's window had room for it
    sim.deliver("b")
    assert [t for t, _ in sim.slots["b"].queue] == [ids[2]] and sim.slots["a"].queue == []
    sim.sched.validate()


def test_the_gpu_slots_of_a_host_share_the_last_tasks_as_cpu_slots_do() -> None:
    """Each GPU slot offers its own "gpu:N": counted by capabilities each was a lone slot of
    its kind, always filling its window, so four GPU tasks on four idle GPUs went to the
    first one's window, to run one after another while three GPUs idled."""
    sim = Sim(Scheduler(SchedulerConfig(initial_window=4), seed=0))
    for index in range(4):
        sim.add_slot(f"g{index}", host_id="a", caps=("gpu", f"gpu:{index}"))
    ids = [sim.submit(requires=("gpu",)) for _ in range(4)]
    assert [[t for t, _ in sim.slots[f"g{i}"].queue] for i in range(4)] == [[t] for t in ids]
    sim.sched.validate()
    lone = Sim(Scheduler(SchedulerConfig(initial_window=4), seed=0))  # a lone GPU slot still fills its window
    lone.add_slot("c0", host_id="a")
    lone.add_slot("c1", host_id="a")
    lone.add_slot("g0", host_id="a", caps=("gpu", "gpu:0"))
    gpu_ids = [lone.submit(requires=("gpu",)) for _ in range(3)]
    assert [t for t, _ in lone.slots["g0"].queue] == gpu_ids


def test_a_slot_of_long_tasks_holds_two_behind_the_running_one_by_default() -> None:
    """Tasks far longer than the round trip want a window of 1 + 1; the default floor of 3
    keeps a second task on its way while the next one already waits in the slot, so a short
    task among long ones does not leave the slot idle (issue 17, bench/RESULTS.md session 18)."""
    sim = sim_with("a", "b")
    for _ in range(40):
        sim.submit()
    for _ in range(3):
        for slot_id in ("a", "b"):
            sim.start(slot_id)
            sim.finish(slot_id, run_s=2.0)
            sim.deliver(slot_id)
    for slot_id in ("a", "b"):
        record = sim.sched._slots[slot_id]
        assert record.window_limit == 3
        assert len(sim.slots[slot_id].queue) == 3
    sim.sched.validate()


def test_windows_fill_ahead_while_enough_tasks_wait_and_a_lone_slot_always() -> None:
    backlog = sim_with("a", "b", config=SchedulerConfig(initial_window=4, min_window=4))
    for _ in range(20):
        backlog.submit()
    backlog.start("a")
    backlog.finish("a")
    backlog.deliver("a")  # a's first result: it refills from a backlog of 18, 4 deep
    assert len(backlog.slots["a"].queue) == 4
    lone = sim_with("a", config=SchedulerConfig(initial_window=4))
    for _ in range(3):
        lone.submit()
    assert len(lone.slots["a"].queue) == 3  # no other slot to keep them for
    backlog.sched.validate()
    lone.sched.validate()


def test_slots_held_back_by_the_tail_fill_up_once_enough_work_waits() -> None:
    """A burst that starts as a tail (the first submissions of an idle pool) does not leave
    each slot one task deep until its first result: once two tasks per slot wait, the slots
    held back fill their windows (a stopped host then congests its session, test_pool_flow)."""
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=4, min_window=4))
    for _ in range(3):
        sim.submit()
    assert len(sim.slots["a"].queue) == 1 and len(sim.slots["b"].queue) == 1
    for _ in range(9):
        sim.submit()
    assert len(sim.slots["a"].queue) == 4 and len(sim.slots["b"].queue) == 4
    assert sim.sched.queued == 4
    sim.sched.validate()


def warmed(config: SchedulerConfig) -> Sim:
    """Slots "a" and "b", each with one task of 0.01 s done: their run times are known."""
    sim = sim_with("a", "b", config=config)
    for _ in range(2):
        sim.submit()
    for slot_id in ("a", "b"):
        sim.start(slot_id)
        sim.finish(slot_id)
        sim.deliver(slot_id)
    return sim


def run_round(sim: Sim) -> list[tuple[int, bool]]:
    """Each slot finishes a task: (tasks waiting before its refill, whether the task sent behind
    its other one is a tail task), for the refills that send one."""
    tails = []
    for slot_id in ("a", "b"):
        sim.start(slot_id)
        sim.finish(slot_id)
        before = len(sim.instructions)
        queued = sim.sched.queued
        sim.deliver(slot_id)
        for send in sends(sim.instructions[before:]):
            tails.append((queued, send.tail == send.task_ids))
    return tails


def test_tasks_sent_behind_another_near_the_end_are_tail_tasks() -> None:
    """While fewer than `tail_unfed_tasks_per_slot` (4) tasks per slot wait, a task sent to a
    slot already holding one is a tail task (`SendTasks.tail`: its agent keeps it unfed,
    stealable, `tailfeed.py`); one sent to an empty slot, or while more wait, is not."""
    sim = warmed(SchedulerConfig(initial_window=2, min_window=2))
    out = sim.sched.handle_many([ev.TaskSubmitted(task_id=i) for i in range(2, 18)], now=1.0)
    sim._apply(out)
    sim.submitted += range(2, 18)
    # a burst handled one submission at a time: the windows' second tasks went while few waited
    assert [(s.task_ids, s.tail) for s in sends(out)] == [((2, 4), (4,)), ((3, 7), (7,))]
    tails = [refill for _ in range(6) for refill in run_round(sim)]
    # sent behind the slot's other task: a tail task exactly when fewer than 4 per slot wait
    # once it has gone; under 2 per slot (the tail rule) only to an empty slot, and not as one
    assert tails == [(12, False), (11, False), (10, False), (9, False)] + [(n, True) for n in (8, 7, 6, 5, 4)] + [
        (3, False)
    ]
    for off in (SchedulerConfig(tail_unfed_tasks_per_slot=0), SchedulerConfig(default_round_trip=0.02)):
        # off, or tasks (0.01 s) shorter than the round trip: a steal-back could not run them sooner
        sim = warmed(replace(off, initial_window=2, min_window=2))
        for _ in range(16):
            sim.submit()
        tails = [refill for _ in range(6) for refill in run_round(sim)]
        assert {4, 5, 6, 7} <= {n for n, _ in tails} and not any(tail for _, tail in tails)
        assert all(s.tail == () for s in sends(sim.instructions))


def test_an_idle_slot_steals_back_a_tail_task_from_behind_a_long_one() -> None:
    """The tail task behind a long-running task is what the agent still holds unfed: an idle
    slot asks for it back and runs it; every task resolves once."""
    sim = warmed(SchedulerConfig(initial_window=2, min_window=2))
    for _ in range(16):
        sim.submit()
    [behind_a] = [s.tail for s in sends(sim.instructions) if s.slot_id == "a" and s.tail]
    sim.start("a")  # runs long; its tail task waits at its agent
    sim.deliver("a")
    ran_on_b = []
    for _ in range(40):
        ran_on_b.append(sim.start("b"))
        sim.finish("b")
        sim.deliver("b")
        sim.answer_steals("a")
        sim.deliver("a")
    assert behind_a[0] in ran_on_b
    assert sim.sched.stats.steal_backs_returned == 1
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    sim.sched.validate()


def test_every_task_runs_once_and_resolves_succeeded() -> None:
    sim = sim_with("a", "b", "c")
    for _ in range(50):
        sim.submit()
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert all(sim.status_of(t) is TaskStatus.SUCCEEDED for t in sim.submitted)
    sim.sched.validate()
    assert sim.sched.unresolved == 0 and sim.sched.queued == 0


def test_send_instructions_batch_per_slot() -> None:
    sim = sim_with("a", config=SchedulerConfig(initial_window=8))
    out = sim.sched.handle_many([ev.TaskSubmitted(task_id=i) for i in range(5)], now=1.0)
    assert sends(out) == [ev.SendTasks(slot_id="a", task_ids=(0, 1, 2, 3, 4), attempts=(1, 1, 1, 1, 1))]


def test_higher_priority_overtakes_queued_work() -> None:
    sim = sim_with("a", config=SchedulerConfig(initial_window=1, min_window=1))
    first = sim.submit()
    low = [sim.submit(priority=0) for _ in range(3)]
    high = sim.submit(priority=3)
    order = []
    for _ in range(5):
        sim.start("a")
        order.append(sim.finish("a"))
        sim.deliver("a")
    assert order == [first, high, *low]


def test_higher_priority_work_in_another_slots_deque_runs_before_this_ones_lower() -> None:
    """Two slots, each busy: LOW tasks went into one slot's deque, then HIGH ones into the
    other's; the first slot ran its LOW deque while the HIGH tasks waited in the other's
    (39 of 40 LOW tasks started before the last HIGH one)."""
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=1, min_window=1, max_window=1))
    blockers = [sim.submit() for _ in range(2)]
    low = [sim.submit(priority=0) for _ in range(10)]
    high = [sim.submit(priority=2) for _ in range(10)]
    order = []
    for _ in range(22):
        for slot in ("a", "b"):
            if sim.sched.unresolved:
                sim.start(slot)
                order.append(sim.finish(slot))
                sim.deliver(slot)
    assert set(order[:2]) == set(blockers)
    ran = [t for t in order if t not in blockers]
    last_high = max(ran.index(t) for t in high)
    assert all(ran.index(t) > last_high for t in low[2:]), ran  # at most what was sent before them
    sim.assert_each_resolved_once()
    sim.sched.validate()


def test_gpu_tasks_only_reach_gpu_slots() -> None:
    sim = sim_with("cpu0")
    sim.add_slot("gpu0", caps=("gpu",))
    gpu_tasks = [sim.submit(requires=("gpu",)) for _ in range(5)]
    cpu_tasks = [sim.submit() for _ in range(5)]
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    for ins in sim.instructions:
        if isinstance(ins, ev.SendTasks):
            expected = set(gpu_tasks) if ins.slot_id == "gpu0" else set(cpu_tasks)
            assert set(ins.task_ids) <= expected


def test_task_no_slot_can_run_is_unschedulable_with_a_reason() -> None:
    sim = sim_with("cpu0")
    task = sim.submit(requires=("gpu",))
    [res] = sim.resolved[task]
    assert res.status is TaskStatus.UNSCHEDULABLE
    assert "gpu" in res.reason and "cpu" in res.reason
    assert res.reason.endswith("change the task's backend")
    tagged = sim.submit(requires=("cpu", "avx512"))  # a tag no slot offers: the fix is the tag
    [res] = sim.resolved[tagged]
    assert res.reason.endswith("change the task's requires= (or its backend)")


def test_expected_host_makes_tasks_wait_until_it_joins() -> None:
    sim = Sim()
    sim.handle(ev.HostExpected(host_id="g", slot_capabilities=(frozenset({"gpu"}),)))
    task = sim.submit(requires=("gpu",))
    assert task not in sim.resolved and sim.sched.queued == 1
    sim.add_slot("g/0", host_id="g", caps=("gpu",))
    sim.run_to_completion()
    assert sim.status_of(task) is TaskStatus.SUCCEEDED
    # once the host is retired for good, new GPU work fails at once
    sim.lose("g/0", retired=True)
    sim.handle(ev.HostLost(host_id="g", reason="gave up relaunching", retired=True))
    late = sim.submit(requires=("gpu",))
    assert sim.status_of(late) is TaskStatus.UNSCHEDULABLE
    # the slots were there: the reason says they were retired, not to change the backend
    [res] = sim.resolved[late]
    assert res.reason.startswith("no slot offers gpu any more: every host that had one was retired")


def test_a_host_up_without_what_it_was_expected_to_offer_fails_the_work_waiting_for_it() -> None:
    """`slots = 0` on a machine without a GPU: the configuration promised a CPU slot, the host
    said hello with none. The runtime says what it has (`HostExpected` again, from its hello);
    the task that waited for the promise resolves, and later ones fail at once."""
    sim = Sim()
    sim.handle(ev.HostExpected(host_id="h", slot_capabilities=(frozenset({"cpu"}),)))
    waiting = sim.submit()
    gpu_work = sim.submit(requires=("gpu",))
    assert waiting not in sim.resolved and sim.sched.queued == 1
    assert sim.status_of(gpu_work) is TaskStatus.UNSCHEDULABLE  # never promised: failed at once
    sim.handle(ev.HostExpected(host_id="h", slot_capabilities=()))
    [res] = sim.resolved[waiting]
    assert res.status is TaskStatus.UNSCHEDULABLE and sim.sched.queued == 0
    assert res.reason.startswith("no slot offers cpu (the cluster offers: no slots at all)")
    assert sim.status_of(sim.submit()) is TaskStatus.UNSCHEDULABLE


def test_idle_slot_steals_oldest_from_a_victims_deque() -> None:
    config = SchedulerConfig(initial_window=1, min_window=1, max_window=1, story_length=100)
    sim = sim_with("a", config=config)
    ids = [sim.submit() for _ in range(10)]  # a's window holds 0; 1..9 wait in the injector
    sim.start("a")
    sim.finish("a")
    sim.deliver("a")  # a grabs a fair share (all 9, it is the only slot) into its deque
    assert [v.deque_depth for v in sim.sched.slots()] == [8]
    sim.add_slot("b")  # b is hungry: the injector is empty, so it steals a's oldest
    [b_task] = [t for t, _ in sim.slots["b"].queue]
    assert b_task == ids[2]
    views = {v.slot_id: v for v in sim.sched.slots()}
    assert views["b"].steals_in == 1 and views["a"].steals_out == 1
    assert sim.sched.stats.steals == 1
    sim.run_to_completion()
    sim.assert_each_resolved_once()


def test_steal_back_is_transactional() -> None:
    config = SchedulerConfig(initial_window=4)
    sim = sim_with("a", config=config)
    ids = [sim.submit() for _ in range(4)]
    sim.start("a")  # ids[0] runs, 1..3 queued at a's agent
    sim.deliver("a")
    sim.add_slot("b")  # nothing anywhere: b asks a's agent for the newest half back
    [request] = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert request.slot_id == "a" and request.task_ids == (ids[2], ids[3])
    # before the agent answers, ids[2] starts on a (say ids[0] ended and ids[1] too)
    sim.finish("a")
    sim.start("a")
    sim.finish("a")
    sim.start("a")  # ids[2] now running
    sim.answer_steals("a")
    sim.deliver("a")
    assert [t for t, _ in sim.slots["b"].queue] == [ids[3]]
    assert sim.sched.stats.steal_backs_returned == 1 and sim.sched.stats.steal_backs_refused == 1
    sim.sched.validate()
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    # ids[3] started only on b: one attempt
    assert sim.resolved[ids[3]][0].attempts == 1 and sim.resolved[ids[3]][0].slot_id == "b"


def test_refused_tasks_are_not_asked_for_again() -> None:
    sim = sim_with("a", config=SchedulerConfig(initial_window=2))
    ids = [sim.submit() for _ in range(2)]
    sim.add_slot("b")
    requests = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert requests[-1].task_ids == (ids[1],)
    sim.start("a")
    sim.finish("a")
    sim.start("a")  # ids[1] starts before the request arrives
    sim.answer_steals("a")
    sim.deliver("a")
    again = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert len(again) == 1


def test_lost_slot_requeues_and_counts_only_started_attempts() -> None:
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))  # windows, not the tail
    ids = [sim.submit() for _ in range(4)]
    sim.start("a")
    sim.deliver("a")
    sim.lose("a", reason="host unreachable")
    requeued = {i.task_id: i for i in sim.instructions if isinstance(i, ev.AnnounceRequeue)}
    assert set(requeued) == {ids[0], ids[2]}
    assert requeued[ids[0]].attempts == 1 and requeued[ids[2]].attempts == 0
    # the metrics' two counts: every requeue (the dashboard's REQUEUED), and started attempts run again
    assert (sim.sched.stats.requeues, sim.sched.stats.retries) == (2, 1)
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert sim.resolved[ids[0]][0].attempts == 2
    assert sim.resolved[ids[2]][0].attempts == 1


def test_a_task_whose_host_keeps_going_down_before_it_starts_is_lost_not_requeued_for_ever() -> None:
    """It may be what takes its host down (an argument larger than the host's memory gets
    the agent killed as it arrives): max_attempts + 2 losses before a start, then LOST; the
    task that started ahead of it each time is charged its attempts as before."""
    sim = sim_with("a", config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))
    ahead = sim.submit(max_attempts=9)
    poison = sim.submit(max_attempts=3)
    for loss in range(1, 6):
        assert [t for t, _ in sim.slots["a"].queue] == [ahead, poison]  # both sent there again
        sim.start("a")
        sim.deliver("a")  # `ahead` started; `poison` waits behind it
        sim.lose("a", reason=f"agent killed ({loss})")
        sim.sched.validate()
        if loss < 5:
            assert poison not in sim.resolved
            sim.rejoin("a")
    [res] = sim.resolved[poison]
    assert res.status is TaskStatus.LOST
    assert res.reason.startswith("its host went down 5 times while it waited there, before it started")
    assert "(last: a lost: agent killed (5))" in res.reason and "max_attempts=3 allows 5" in res.reason
    sim.rejoin("a")
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert sim.resolved[ahead][0].status is TaskStatus.SUCCEEDED and sim.resolved[ahead][0].attempts == 6


def test_a_host_lost_once_is_one_loss_to_each_task_that_waited_there() -> None:
    """Its slots were lost one by one: a task requeued from the first was fed to the next,
    still up, and lost with it again, so that one loss of a host of 8 slots failed a task
    that had waited there as "went down 5 times" (and counted 8 requeues)."""
    sim = Sim(Scheduler(SchedulerConfig(initial_window=2, tail_tasks_per_slot=0)))
    for index in range(8):
        sim.add_slot(f"big/{index}", host_id="big")
    sim.add_slot("other/0", host_id="other")
    for _ in range(9):  # one on every slot, so that the next waits behind one of big's
        sim.submit()
    waiting = sim.submit()
    assert any(t == waiting for t, _ in sim.slots["big/0"].queue)
    for slot_id in sim.slots:
        sim.start(slot_id)
    sim.lose_host("big", reason="no heartbeat for 8.0s")
    sim.sched.validate()
    requeued = [i for i in sim.instructions if isinstance(i, ev.AnnounceRequeue) and i.task_id == waiting]
    assert len(requeued) == 1 and requeued[0].reason == "big/0 lost before it started: no heartbeat for 8.0s"
    assert waiting not in sim.resolved
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert sim.resolved[waiting][0].status is TaskStatus.SUCCEEDED and sim.resolved[waiting][0].slot_id == "other/0"


def test_an_attempt_that_died_is_retried_on_another_host_that_can_run_it() -> None:
    """From the injector, the slot restarted where the worker died took the task again: a
    task that one host's memory limit kills was retried there until lost (all 3 attempts on
    one slot), while the other hosts ran its like."""
    sim = Sim(Scheduler(SchedulerConfig(initial_window=1, tail_tasks_per_slot=0)))
    sim.add_slot("small/0", host_id="small")
    sim.add_slot("big/0", host_id="big")
    hog = sim.submit(max_attempts=3)
    busy = sim.submit()  # the big host is busy: the small one's slot is the first free again
    assert [t for t, _ in sim.slots["small/0"].queue] == [hog] and [t for t, _ in sim.slots["big/0"].queue] == [busy]
    sim.start("big/0")
    sim.start("small/0")
    sim.finish("small/0", outcome=Outcome.CRASHED)  # the kernel's OOM killer
    sim.deliver("small/0")
    sim.sched.validate()
    assert not sim.slots["small/0"].queue, "retried where it died"
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    result = sim.resolved[hog][0]
    assert result.status is TaskStatus.SUCCEEDED and result.slot_id == "big/0" and result.attempts == 2


def test_retired_slots_are_not_held_against_a_task_that_had_not_started() -> None:
    """Slots retired for good (drained, an allocation that ended) are not the task's doing."""
    sim = sim_with(*"abcdef", config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))
    task = sim.submit(max_attempts=1 + 1)  # 4 losses before a start would lose it
    losses = 0
    for _ in range(5):
        holder = next(slot_id for slot_id, slot in sim.slots.items() if any(t == task for t, _ in slot.queue))
        sim.lose(holder, reason="drained", retired=True)
        losses += 1
    assert losses == 5 and task not in sim.resolved
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert sim.resolved[task][0].status is TaskStatus.SUCCEEDED


def test_task_not_safe_to_repeat_is_lost_with_its_slot_even_before_a_start_arrives() -> None:
    """retry=False (max_attempts=1): the agent may have started what the scheduler has not
    seen start (its Started can be on the way), so the loss fails the task; nothing reruns it."""
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))  # windows, not the tail
    once = [sim.submit(max_attempts=1) for _ in range(4)]  # a: once[0], once[2]; b: once[1], once[3]
    repeatable = sim.submit()
    sim.start("a")
    sim.deliver("a")  # once[0] seen to start; once[2] sent there, no start seen
    sim.lose("a", reason="host unreachable")
    sim.sched.validate()
    requeued = {i.task_id for i in sim.instructions if isinstance(i, ev.AnnounceRequeue)}
    assert not requeued & {once[0], once[2]}
    for task in (once[0], once[2]):
        [res] = sim.resolved[task]
        assert res.status is TaskStatus.LOST and res.attempts == 1 and res.slot_id == "a"
    assert sim.resolved[once[2]][0].reason.startswith("may have run on h0; not retried because retry=False")
    # the one seen to start was not the task's fault either ("its worker died on all 1 attempts")
    assert sim.resolved[once[0]][0].reason == (
        "was running on h0 when it was lost; not retried because retry=False (a lost: host unreachable)"
    )
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert [sim.status_of(t) for t in (once[1], once[3], repeatable)] == [TaskStatus.SUCCEEDED] * 3
    sent_again = [t for i in sim.instructions if isinstance(i, ev.SendTasks) and i.slot_id == "b" for t in i.task_ids]
    assert once[0] not in sent_again and once[2] not in sent_again


def test_task_that_kills_every_worker_fails_after_max_attempts() -> None:
    sim = sim_with("a", "b")
    poison = sim.submit(max_attempts=3)
    for _ in range(3):
        slot_id = next(s for s, f in sim.slots.items() if any(t == poison for t, _ in f.queue))
        sim.start(slot_id)
        sim.finish(slot_id, outcome=Outcome.CRASHED)
        sim.deliver(slot_id)
    [res] = sim.resolved[poison]
    assert res.status is TaskStatus.LOST and res.attempts == 3
    assert "all 3 attempts" in res.reason
    other = sim.submit()
    sim.run_to_completion()
    assert sim.status_of(other) is TaskStatus.SUCCEEDED


def test_kernel_error_is_final_not_retried() -> None:
    sim = sim_with("a")
    task = sim.submit()
    sim.start("a")
    sim.finish("a", outcome=Outcome.ERROR)
    sim.deliver("a")
    assert sim.status_of(task) is TaskStatus.FAILED
    assert sim.resolved[task][0].attempts == 1


def test_late_and_duplicate_results_are_dropped_and_counted() -> None:
    sim = sim_with("a", "b")
    task = sim.submit()
    slot_id = next(s for s, f in sim.slots.items() if f.queue)
    sim.start(slot_id)
    sim.finish(slot_id)
    finished = sim.slots[slot_id].outbox[-1]
    sim.deliver(slot_id)
    sim.handle(finished)  # the same result again
    sim.handle(
        ev.TaskOutcomeReported(task_id=task, slot_id="b" if slot_id == "a" else "a", attempt=1, outcome=Outcome.OK)
    )
    sim.handle(ev.TaskOutcomeReported(task_id=999, slot_id="a", attempt=1, outcome=Outcome.OK))
    assert sim.sched.stats.dropped_results == 3
    assert len(sim.resolved[task]) == 1


def test_result_from_an_earlier_attempt_is_dropped() -> None:
    sim = sim_with("a", config=SchedulerConfig(initial_window=1, min_window=1))
    task = sim.submit()
    sim.start("a")
    sim.deliver("a")
    sim.lose("a")
    sim.rejoin("a")  # the task is resent as attempt 2
    assert sim.slots["a"].queue == [(task, 2)]
    sim.handle(ev.TaskOutcomeReported(task_id=task, slot_id="a", attempt=1, outcome=Outcome.OK))
    assert task not in sim.resolved and sim.sched.stats.dropped_results == 1


@pytest.mark.parametrize("where", ["injector", "deque", "queued_at_agent", "running"])
def test_cancel_resolves_once_wherever_the_task_is(where: str) -> None:
    sim = sim_with("a", config=SchedulerConfig(initial_window=2, min_window=1))
    ids = [sim.submit() for _ in range(6)]
    if where == "deque":
        sim.start("a")
        sim.finish("a")
        sim.deliver("a")  # a grabbed the injector into its deque
    target = {"injector": ids[5], "deque": ids[5], "queued_at_agent": ids[1], "running": ids[0]}[where]
    if where == "running":
        sim.start("a")
    assert sim.sched.where(target) is not None
    sim.handle(ev.CancelRequested(task_id=target))
    assert sim.status_of(target) is TaskStatus.CANCELLED
    sim.deliver("a")
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    sim.sched.validate()
    assert sim.sched.stats.dropped_results == 0


def test_timeout_backstop_aborts_and_resolves() -> None:
    config = SchedulerConfig(timeout_grace=1.0)
    sim = sim_with("a", config=config)
    task = sim.submit(timeout=2.0)
    sim.start("a")
    sim.deliver("a")
    wake = sim.sched.next_wakeup()
    assert wake is not None and wake == pytest.approx(sim.now + 3.0, abs=0.01)
    out = sim.sched.handle(ev.TimerFired(), now=wake)
    sim._apply(out)
    assert any(isinstance(i, ev.AbortTasks) and i.task_ids == (task,) for i in out)
    assert sim.status_of(task) is TaskStatus.TIMED_OUT
    sim.deliver("a")  # the agent confirms the kill; the zombie leaves the window
    sim.sched.validate()
    assert sim.sched.in_flight == 0


def test_backpressure_bounds_queued_tasks() -> None:
    sched = Scheduler(SchedulerConfig(max_queued=3))
    for i in range(3):  # no slot and no expected host: unschedulable at once, never queued
        sched.handle(ev.TaskSubmitted(task_id=i), now=0.0)
    assert sched.queued == 0
    sched.handle(ev.HostExpected(host_id="h", slot_capabilities=(frozenset({"cpu"}),)), now=0.0)
    for i in range(10, 13):
        sched.handle(ev.TaskSubmitted(task_id=i), now=0.0)
    assert not sched.can_accept()
    with pytest.raises(SchedulerError, match="full"):
        sched.handle(ev.TaskSubmitted(task_id=99), now=0.0)


def test_misuse_by_the_driver_is_a_batuta_error() -> None:
    sched = Scheduler()
    sched.handle(ev.HostExpected(host_id="h", slot_capabilities=(frozenset({"cpu"}),)), now=0.0)
    sched.handle(ev.TaskSubmitted(task_id=1), now=0.0)
    with pytest.raises(BatutaError, match="task id 1 submitted twice") as caught:
        sched.handle(ev.TaskSubmitted(task_id=1), now=0.0)
    assert isinstance(caught.value, SchedulerError)


def test_pause_holds_new_work_and_resume_releases_it() -> None:
    sim = sim_with("a")
    sim.handle(ev.SchedulingPaused())
    task = sim.submit()
    assert sim.slots["a"].queue == []
    sim.handle(ev.SchedulingResumed())
    assert sim.slots["a"].queue == [(task, 1)]


def test_a_users_pause_asks_back_what_the_agents_hold_unstarted_and_nothing_new_starts() -> None:
    """A window grown on short tasks held dozens of tasks at the agent, which went on starting
    for long after `p` ("queued ones wait"). With `recall` the unstarted ones come back to the
    injector until the resume; the running one finishes; `ship`'s pause (no recall) keeps them."""
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=4, tail_tasks_per_slot=0))
    ids = [sim.submit() for _ in range(10)]  # 4 in each window, 2 queued here
    running = sim.start("a")
    sim.deliver("a")
    sim.handle(ev.SchedulingPaused(recall=True))
    asked = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert {i.slot_id for i in asked} == {"a", "b"}
    assert running not in {t for i in asked for t in i.task_ids}  # it started: it finishes
    sim.answer_steals("a")
    sim.answer_steals("b")
    sim.deliver("a")
    sim.deliver("b")
    sim.sched.validate()
    assert sim.slots["a"].queue == [] and sim.slots["b"].queue == []  # nothing left to start
    assert sim.sched.queued == len(ids) - 1
    sim.finish("a")
    sim.deliver("a")
    assert sim.slots["a"].queue == []  # a slot that ran dry is not fed while paused
    sim.handle(ev.SchedulingResumed())
    sim.run_to_completion()
    sim.assert_each_resolved_once()

    kept = sim_with("a", config=SchedulerConfig(initial_window=4, tail_tasks_per_slot=0))
    [kept.submit() for _ in range(4)]
    kept.handle(ev.SchedulingPaused())  # ship's: what is out finishes with the code it was sent for
    assert not any(isinstance(i, ev.RequestStealBack) for i in kept.instructions)


def test_a_drain_is_undone_and_the_host_takes_work_again() -> None:
    """Draining the only host left its queue stuck for good: the undo gives it work again."""
    sim = sim_with(config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))
    sim.add_slot("x/0", host_id="x")
    sim.handle(ev.HostDrainRequested(host_id="x"))
    waiting = [sim.submit() for _ in range(3)]
    assert sim.slots["x/0"].queue == [] and sim.sched.queued == 3
    sim.handle(ev.HostDrainRequested(host_id="x", undo=True))
    assert [t for t, _ in sim.slots["x/0"].queue] == waiting[:2]  # its window filled again
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert all(sim.resolved[t][0].slot_id == "x/0" for t in waiting)


def test_an_undrained_host_takes_work_submitted_after_the_undo() -> None:
    """With nothing queued at the undo, its slots were never offered work again: 0 of 308
    tasks went to the undrained host while the others took them all."""
    sim = sim_with(config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))
    sim.add_slot("x/0", host_id="x")
    sim.add_slot("y/0", host_id="y")
    sim.handle(ev.HostDrainRequested(host_id="x"))
    sim.handle(ev.HostDrainRequested(host_id="x", undo=True))
    ids = [sim.submit() for _ in range(4)]
    assert len(sim.slots["x/0"].queue) == 2  # its window filled at submission, as y's
    sim.run_to_completion()
    sim.assert_each_resolved_once()
    assert {sim.resolved[t][0].slot_id for t in ids} == {"x/0", "y/0"}


def test_a_drained_host_stays_drained_through_a_relaunch() -> None:
    """Its agent killed and relaunched, a drained host came back up and took work again,
    silently: the drain had been forgotten once it was complete."""
    sim = sim_with(config=SchedulerConfig(initial_window=2, tail_tasks_per_slot=0))
    sim.add_slot("x/0", host_id="x")
    sim.add_slot("y/0", host_id="y")
    sim.handle(ev.HostDrainRequested(host_id="x"))
    assert sum(isinstance(i, ev.AnnounceDrained) for i in sim.instructions) == 1
    sim.handle(ev.HostLost(host_id="x", reason="agent killed", retired=False))
    sim.add_slot("x/0", host_id="x")  # relaunched: its slot joins again
    assert sum(isinstance(i, ev.AnnounceDrained) for i in sim.instructions) == 2  # said again: it was "up"
    ids = [sim.submit() for _ in range(4)]
    sim.run_to_completion()
    assert {sim.resolved[t][0].slot_id for t in ids} == {"y/0"}
    sim.handle(ev.HostDrainRequested(host_id="x", undo=True))  # until undone
    more = [sim.submit() for _ in range(4)]
    sim.run_to_completion()
    assert "x/0" in {sim.resolved[t][0].slot_id for t in more}


def test_drain_moves_queued_work_away_and_reports_when_empty() -> None:
    sim = sim_with(config=SchedulerConfig(initial_window=1, min_window=1))
    sim.add_slot("x/0", host_id="x")
    sim.add_slot("y/0", host_id="y")
    ids = [sim.submit() for _ in range(6)]
    sim.start("x/0")
    sim.handle(ev.HostDrainRequested(host_id="x"))
    assert not any(isinstance(i, ev.AnnounceDrained) for i in sim.instructions)
    sim.run_to_completion()
    assert any(isinstance(i, ev.AnnounceDrained) and i.host_id == "x" for i in sim.instructions)
    sim.assert_each_resolved_once()
    ran_on_x = [t for t in ids if sim.resolved[t][0].slot_id == "x/0"]
    assert ran_on_x == [ids[0]]  # only the task already in x's window when the drain began


def test_window_grows_for_short_tasks_and_shrinks_for_long_ones() -> None:
    sim = sim_with("a", config=SchedulerConfig(min_window=2, max_window=32, default_round_trip=0.001))
    for _ in range(40):
        sim.submit()
    for _ in range(10):
        sim.start("a")
        sim.finish("a", run_s=0.00001)
        sim.deliver("a")
    [view] = sim.sched.slots()
    assert view.window_limit == 32
    for _ in range(20):
        sim.start("a")
        sim.finish("a", run_s=0.5)
        sim.deliver("a")
    [view] = sim.sched.slots()
    assert view.window_limit == 2


def test_seeded_victim_choice_is_reproducible() -> None:
    def run(seed: int) -> list[ev.Instruction]:
        sim = sim_with("a", "b", "c", config=SchedulerConfig(initial_window=1, min_window=1), seed=seed)
        for _ in range(30):
            sim.submit()
        sim.run_to_completion()
        return sim.instructions

    assert run(7) == run(7)


def test_validate_catches_a_task_in_two_places_and_a_counter_off_by_one() -> None:
    sim = sim_with("a", "b", config=SchedulerConfig(initial_window=1, min_window=1, story_length=1000))
    task_id = sim.submit()
    sim.sched.validate()
    assert sim.sched.where(task_id) == ("window", "a")
    entry = sim.sched._slots["a"].window[task_id]
    sim.sched._slots["b"].deque.append(entry)  # corrupt: the task is now in two places
    sim.sched._queued += 1
    with pytest.raises(InvariantViolation, match=rf"task {task_id} in window of a and in deque of b \(story: .*queued"):
        sim.sched.validate()
    sim.sched._slots["b"].deque.clear()  # corrupt: only the counter is wrong now
    with pytest.raises(InvariantViolation, match=r"queued counter 1 != 0 \+ 0"):
        sim.sched.validate()
