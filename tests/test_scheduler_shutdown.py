"""Closing, payloads and live capabilities in the scheduler core, without an event loop."""

from __future__ import annotations

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import CAP_CPU, CAP_GPU, Outcome, TaskStatus


def scheduler_with_cpu_slot(window: int = 2) -> Scheduler:
    sched = Scheduler(SchedulerConfig(initial_window=window, min_window=1))
    sched.handle(ev.SlotJoined(slot_id="h/0", host_id="h", capabilities=frozenset({CAP_CPU})), 0.0)
    return sched


def test_shutdown_cancels_every_unresolved_task_once_and_then_places_nothing() -> None:
    sched = scheduler_with_cpu_slot(window=2)
    sent = sched.handle_many([ev.TaskSubmitted(task_id=i) for i in range(5)], 0.0)
    assert [i.task_ids for i in sent if isinstance(i, ev.SendTasks)] == [(0, 1)]
    out = sched.handle(ev.ShutdownRequested(reason="pool closed"), 1.0)
    assert out == [
        ev.ResolveTask(
            task_id=i, status=TaskStatus.CANCELLED, slot_id=None, attempts=1 if i < 2 else 0, reason="pool closed"
        )
        for i in range(5)
    ]
    assert sched.queued == 0 and sched.in_flight == 0 and sched.unresolved == 0
    # what the hosts still say while they are shut down: no sends, no second resolution
    late = sched.handle_many(
        [
            ev.TaskOutcomeReported(task_id=0, slot_id="h/0", attempt=1, outcome=Outcome.OK),
            ev.SlotJoined(slot_id="h/1", host_id="h", capabilities=frozenset({CAP_CPU})),
            ev.TaskSubmitted(task_id=9),
            ev.TimerFired(),
        ],
        2.0,
    )
    assert late == []
    assert sched.stats.dropped_results == 1
    assert sched.next_wakeup() is None


def test_a_finishing_report_carries_its_payload_to_the_resolution() -> None:
    sched = scheduler_with_cpu_slot()
    sched.handle(ev.TaskSubmitted(task_id=1), 0.0)
    payload = object()
    out = sched.handle(
        ev.TaskOutcomeReported(task_id=1, slot_id="h/0", attempt=1, outcome=Outcome.OK, payload=payload), 1.0
    )
    (resolved,) = [i for i in out if isinstance(i, ev.ResolveTask)]
    assert resolved.status is TaskStatus.SUCCEEDED and resolved.payload is payload


def test_capabilities_offered_follow_the_live_slots() -> None:
    sched = scheduler_with_cpu_slot()
    assert sched.offers(CAP_CPU) and not sched.offers(CAP_GPU)
    sched.handle(ev.SlotJoined(slot_id="g/0", host_id="g", capabilities=frozenset({CAP_GPU})), 0.0)
    assert sched.offers(CAP_GPU)
    sched.handle(ev.HostLost(host_id="g", reason="kill -9"), 1.0)
    assert not sched.offers(CAP_GPU)  # lost: AUTO must stop choosing the GPU
    sched.handle(ev.SlotJoined(slot_id="g/0", host_id="g", capabilities=frozenset({CAP_GPU})), 2.0)
    assert sched.offers(CAP_GPU)
