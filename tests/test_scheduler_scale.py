"""The scheduler at cluster scale: 4,096 slots, where thieves probe sampled victims.

The hypothesis properties (`test_scheduler_properties.py`) run on four slots; here seeded
interleavings run on 64 hosts of 64 slots each, so every steal goes through the sampled
path (`SchedulerConfig.steal_probes` is far below the slot count), with host losses,
rejoins, cancellations and priorities. `validate()` runs after every pass.
"""

from __future__ import annotations

import random

import pytest

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import TaskStatus
from tests.scheduler_sim import Sim

HOSTS, SLOTS_PER_HOST = 64, 64


def _cluster(seed: int, gpu_hosts: int = 0, config: SchedulerConfig | None = None) -> Sim:
    sim = Sim(Scheduler(config, seed=seed))
    for h in range(HOSTS):
        caps = ("cpu", "gpu") if h < gpu_hosts else ("cpu",)
        for s in range(SLOTS_PER_HOST):
            sim.add_slot(f"h{h}/{s}", host_id=f"h{h}", caps=caps)
    return sim


def _pass(sim: Sim, rng: random.Random, finish_fraction: float) -> None:
    """One round of the fake agents: each up slot answers steals, reports, and finishes its
    running task with probability `finish_fraction` (so slots drift out of step)."""
    for slot_id, slot in sim.slots.items():
        if not slot.up:
            continue
        sim.answer_steals(slot_id)
        if slot.running is not None and rng.random() < finish_fraction:
            sim.finish(slot_id)
        if slot.running is None:
            sim.start(slot_id)
        sim.deliver(slot_id)


def _hosts_slots(sim: Sim, host: str) -> list[str]:
    return [slot_id for slot_id, slot in sim.slots.items() if slot.host_id == host]


@pytest.mark.parametrize("tail_tasks_per_slot", [2, 0])
def test_4096_slots_resolve_every_task_once_through_losses_and_cancels(tail_tasks_per_slot: int) -> None:
    """With the tail rule (the default) every burst here is a tail (fewer tasks than two per
    slot: each goes only to a slot holding none); without it, windows fill ahead, slots
    drift out of step and the sampled stealing paths must run."""
    rng = random.Random(7)
    sim = _cluster(seed=7, gpu_hosts=8, config=SchedulerConfig(tail_tasks_per_slot=tail_tasks_per_slot))
    lost: list[str] = []
    for round_no in range(60):
        for _ in range(rng.randrange(200, 800)):
            sim.submit(priority=rng.randrange(3), requires=("gpu",) if rng.random() < 0.1 else ("cpu",))
        if round_no in (10, 20, 30):  # lose two hosts, one holding GPU slots
            for host in (f"h{rng.randrange(8)}", f"h{rng.randrange(8, HOSTS)}"):
                if host not in lost:
                    lost.append(host)
                    sim.handle(ev.HostLost(host_id=host, reason="test"))
                    for slot_id in _hosts_slots(sim, host):
                        sim.slots[slot_id].up = False
                        sim.slots[slot_id].queue.clear()
                        sim.slots[slot_id].running = None
                        sim.slots[slot_id].steal_requests.clear()
                        sim.slots[slot_id].outbox.clear()
        if round_no in (25, 40):  # the lost hosts come back
            for host in lost:
                for slot_id in _hosts_slots(sim, host):
                    sim.rejoin(slot_id)
            lost.clear()
        if round_no % 7 == 3:
            for _ in range(20):
                sim.handle(ev.CancelRequested(task_id=rng.choice(sim.submitted)))
        _pass(sim, rng, finish_fraction=rng.uniform(0.2, 0.9))
        sim.sched.validate()
    for host in lost:
        for slot_id in _hosts_slots(sim, host):
            sim.rejoin(slot_id)
    sim.run_to_completion(max_steps=10_000)
    sim.sched.validate()
    sim.assert_each_resolved_once()
    assert sim.sched.queued == 0 and sim.sched.in_flight == 0
    stats = sim.sched.stats
    if tail_tasks_per_slot == 0:
        assert stats.steals + stats.steal_backs_requested > 0, "the sampled stealing paths never ran"


def test_priorities_hold_at_4096_slots() -> None:
    """Urgent tasks submitted behind a backlog leave the injector before any more of it does
    (tasks already in a slot's deque or window stay committed, as on a small cluster)."""
    rng = random.Random(3)
    sim = _cluster(seed=3)
    backlog = [sim.submit(priority=0) for _ in range(HOSTS * SLOTS_PER_HOST * 8)]
    for _ in range(3):
        _pass(sim, rng, finish_fraction=0.5)
    waiting = {t for t in backlog if (sim.sched.where(t) or ("",))[0] == "injector"}
    assert len(waiting) > 1_000  # the backlog still queues in the injector
    urgent = [sim.submit(priority=5) for _ in range(20_000)]
    for _ in range(200):
        urgent_queued = sum(1 for t in urgent if (sim.sched.where(t) or ("",))[0] == "injector")
        backlog_moved = sum(1 for t in waiting if (sim.sched.where(t) or ("",))[0] != "injector")
        assert not (urgent_queued and backlog_moved), (
            f"{backlog_moved} backlog tasks left the injector while {urgent_queued} urgent ones waited there"
        )
        if not urgent_queued:
            break
        _pass(sim, rng, finish_fraction=0.5)
    assert urgent_queued == 0
    sim.run_to_completion(max_steps=10_000)
    sim.assert_each_resolved_once()
    assert len(sim.resolved) == len(backlog) + len(urgent)


def test_thieves_find_the_one_busy_deque_among_4096_slots() -> None:
    """All the work lands in one slot's deque; the other slots, joining later, steal it."""
    sim = Sim(Scheduler(seed=1))
    sim.add_slot("busy/0", host_id="busy")
    tasks = [sim.submit() for _ in range(300)]  # 256 (grab_max) go to busy/0's deque
    for h in range(HOSTS):
        for s in range(SLOTS_PER_HOST):
            sim.add_slot(f"h{h}/{s}", host_id=f"h{h}")
    sim.run_to_completion(max_steps=10_000)
    sim.assert_each_resolved_once()
    ran_on = {r[0].slot_id for t in tasks for r in [sim.resolved[t]]}
    assert sim.sched.stats.steals > 0
    assert len(ran_on) > 100, f"only {len(ran_on)} slots ran the 300 tasks"
    assert all(sim.status_of(t) is TaskStatus.SUCCEEDED for t in tasks)
