"""Property: random interleavings never lose or duplicate a task.

Hypothesis drives submit, start, finish (ok, error, crash), steal-back answers, message
delivery, slot loss and rejoin, cancellation and timer ticks through fake agents, checking
the scheduler's invariants after every step. At the end every slot comes back, the cluster
runs dry, and every submitted task must have been resolved exactly once.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Outcome
from tests.scheduler_sim import Sim

SLOTS = {"a": ("cpu",), "b": ("cpu",), "c": ("cpu", "gpu"), "g": ("gpu",)}

actions = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3), st.sampled_from([("cpu",), ("gpu",)]), st.booleans()),
    st.tuples(st.just("start"), st.sampled_from(sorted(SLOTS))),
    st.tuples(
        st.just("finish"),
        st.sampled_from(sorted(SLOTS)),
        st.sampled_from([Outcome.OK, Outcome.OK, Outcome.ERROR, Outcome.CRASHED]),
    ),
    st.tuples(st.just("answer"), st.sampled_from(sorted(SLOTS))),
    st.tuples(st.just("deliver"), st.sampled_from(sorted(SLOTS))),
    st.tuples(st.just("lose"), st.sampled_from(sorted(SLOTS))),
    st.tuples(st.just("rejoin"), st.sampled_from(sorted(SLOTS))),
    st.tuples(st.just("cancel"), st.integers(0, 200)),
    st.tuples(st.just("tick"), st.floats(0.0, 20.0)),
    st.tuples(st.just("pause"), st.sampled_from(["recall", "keep", "resume"])),  # a user's, ship's, resume
)


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(actions, max_size=120), st.integers(0, 3), st.sampled_from([16, 1, 2]))
def test_random_interleavings_never_lose_or_duplicate(steps: list[tuple], seed: int, probes: int) -> None:
    # probes 16: thieves look at all 4 slots; 1 and 2: they draw victims from the samples, as
    # in a cluster larger than `steal_probes`
    config = SchedulerConfig(
        initial_window=2, min_window=1, max_window=4, timeout_grace=1.0, story_length=500, steal_probes=probes
    )
    sim = Sim(Scheduler(config, seed=seed))
    for slot_id, caps in SLOTS.items():
        sim.add_slot(slot_id, host_id=f"host-{slot_id}", caps=caps)
    for step in steps:
        kind = step[0]
        if kind == "submit":
            _, priority, requires, with_timeout = step
            sim.submit(priority=priority, requires=requires, timeout=2.0 if with_timeout else None, max_attempts=2)
        elif kind == "start":
            sim.start(step[1])
        elif kind == "finish":
            sim.finish(step[1], outcome=step[2])
        elif kind == "answer":
            sim.answer_steals(step[1])
        elif kind == "deliver":
            if sim.slots[step[1]].up:
                sim.deliver(step[1])
        elif kind == "lose":
            if sim.slots[step[1]].up:
                sim.lose(step[1])
        elif kind == "rejoin":
            if not sim.slots[step[1]].up:
                sim.rejoin(step[1])
        elif kind == "cancel":
            if sim.submitted:
                sim.handle(ev.CancelRequested(task_id=sim.submitted[step[1] % len(sim.submitted)]))
        elif kind == "tick":
            sim.now += step[1]
            sim._apply(sim.sched.handle(ev.TimerFired(), sim.now))
        elif kind == "pause":
            paused = ev.SchedulingPaused(recall=step[1] == "recall")
            sim.handle(ev.SchedulingResumed() if step[1] == "resume" else paused)
        sim.sched.validate()
        for task_id, resolutions in sim.resolved.items():
            assert len(resolutions) == 1, f"task {task_id} resolved twice: {resolutions}"

    # heal the cluster and let it run dry
    sim.handle(ev.SchedulingResumed())
    for slot_id, slot in sim.slots.items():
        if not slot.up:
            sim.rejoin(slot_id)
    sim.run_to_completion()
    sim.sched.validate()
    sim.assert_each_resolved_once()
    assert sim.sched.queued == 0 and sim.sched.in_flight == 0
