"""The scheduler's dependency rules (core/deps.py): waiting, failure, locality, lineage; and the
property that random pipelines under random faults resolve every task exactly once, never hang."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Outcome, TaskStatus
from tests.scheduler_sim import Sim


def sim_with(hosts: dict[str, str], **config: object) -> Sim:
    """One slot per entry: slot id -> host id."""
    sim = Sim(Scheduler(SchedulerConfig(story_length=200, **config), seed=0))  # type: ignore[arg-type]
    for slot_id, host_id in hosts.items():
        sim.add_slot(slot_id, host_id=host_id)
    return sim


def run_one(sim: Sim, slot_id: str, outcome: Outcome = Outcome.OK) -> int | None:
    sim.start(slot_id)
    task_id = sim.finish(slot_id, outcome=outcome)
    sim.deliver(slot_id)
    return task_id


def test_a_dependent_waits_in_no_queue_until_its_upstream_succeeds() -> None:
    sim = sim_with({"a0": "a"})
    up = sim.submit()
    down = sim.submit(after=(up,))
    assert sim.sched.where(down) == ("waiting", None) and sim.sched.waiting == 1
    sim.sched.validate()
    assert run_one(sim, "a0") == up
    assert sim.sched.where(down) is not None and sim.sched.where(down)[0] != "waiting"  # type: ignore[index]
    sim.run_to_completion()
    assert sim.status_of(down) is TaskStatus.SUCCEEDED


def test_failure_and_cancellation_reach_every_dependent_naming_the_upstream() -> None:
    sim = sim_with({"a0": "a"})
    bad = sim.submit(keep_as=10)
    reader = sim.submit(reads=(10,))
    after_reader = sim.submit(after=(reader,))
    run_one(sim, "a0", Outcome.ERROR)
    assert sim.status_of(bad) is TaskStatus.FAILED
    assert sim.status_of(reader) is TaskStatus.FAILED
    assert f"task {bad}" in sim.resolved[reader][0].reason and "object 10" in sim.resolved[reader][0].reason
    assert sim.status_of(after_reader) is TaskStatus.FAILED
    assert f"upstream task {reader}" in sim.resolved[after_reader][0].reason
    gate = sim.submit()
    child = sim.submit(after=(gate,))
    sim.handle(ev.CancelRequested(task_id=gate))
    assert sim.status_of(child) is TaskStatus.CANCELLED
    assert f"upstream task {gate} cancelled" in sim.resolved[child][0].reason
    sim.sched.validate()
    assert sim.sched.waiting == 0


def test_a_reader_is_queued_on_the_host_holding_its_input_and_other_hosts_do_not_steal_it() -> None:
    sim = sim_with({"a0": "a", "b0": "b"}, initial_window=1, min_window=1, max_window=1)
    made = sim.submit(keep_as=7)
    slot_of_made = next(s for s, slot in sim.slots.items() if slot.queue)
    run_one(sim, slot_of_made)
    readers = [sim.submit(reads=(7,)) for _ in range(3)]
    home = sim.slots[slot_of_made].host_id
    sim.run_to_completion()
    for reader in readers:
        [resolution] = sim.resolved[reader]
        assert resolution.slot_id is not None and sim.slots[resolution.slot_id].host_id == home
    assert sim.status_of(made) is TaskStatus.SUCCEEDED


def test_a_reader_goes_to_the_very_slot_that_made_its_input_when_it_is_about_as_free() -> None:
    sim = Sim(Scheduler(SchedulerConfig(initial_window=1, min_window=1, max_window=1), seed=0))
    sim.add_slot("a0", host_id="a")
    sim.add_slot("a1", host_id="a", caps=("cpu", "t"))  # the producer can only run here
    sim.add_slot("b0", host_id="b")
    sim.submit(keep_as=7, requires=("cpu", "t"))
    assert run_one(sim, "a1") is not None
    reader = sim.submit(reads=(7,))
    assert sim.sched.where(reader) == ("window", "a1")  # not a0, first of the idle slots there


def test_a_long_home_deque_lets_idle_hosts_take_work() -> None:
    sim = sim_with({"a0": "a", "b0": "b"}, initial_window=1, min_window=1, max_window=1, locality_slack=2)
    sim.submit(keep_as=7)
    slot_of_made = next(s for s, slot in sim.slots.items() if slot.queue)
    run_one(sim, slot_of_made)
    readers = [sim.submit(reads=(7,)) for _ in range(8)]
    sim.run_to_completion()
    hosts = {sim.slots[sim.resolved[r][0].slot_id or ""].host_id for r in readers}
    assert hosts == {"a", "b"}


def test_small_inputs_do_not_pin_a_task() -> None:
    sim = sim_with({"a0": "a"}, locality_min_bytes=1 << 30)
    sim.submit(keep_as=7)
    run_one(sim, "a0")
    reader = sim.submit(reads=(7,))
    assert sim.sched.where(reader) == ("window", "a0")  # through the injector, like any task


def test_a_lost_host_remakes_its_objects_and_readers_wait_for_them() -> None:
    sim = sim_with({"a0": "a", "b0": "b"}, initial_window=1, min_window=1, max_window=1)
    made = sim.submit(keep_as=7, max_attempts=2)
    slot_of_made = next(s for s, slot in sim.slots.items() if slot.queue)
    lost_host = sim.slots[slot_of_made].host_id
    run_one(sim, slot_of_made)
    blocker = sim.submit()  # keeps the readers waiting
    reader = sim.submit(reads=(7,), after=(blocker,))
    sim.lose_host(lost_host)
    assert [r.object_id for r in sim.remade] == [7] and sim.remade[0].task_id == made
    assert lost_host in sim.remade[0].reason
    sim.run_to_completion()
    remake = sim.submitted[-1]
    assert sim.status_of(remake) is TaskStatus.SUCCEEDED and sim.status_of(reader) is TaskStatus.SUCCEEDED
    # lost again: max_attempts=2 runs over the object's life are spent, so readers now fail
    survivor = sim.resolved[remake][0].slot_id
    assert survivor is not None
    second_reader = sim.submit(reads=(7,), after=(sim.submit(),))
    sim.lose_host(sim.slots[survivor].host_id)
    for slot_id, slot in sim.slots.items():
        if not slot.up:
            sim.rejoin(slot_id)
    sim.run_to_completion()
    assert len(sim.remade) == 1
    assert sim.status_of(second_reader) is TaskStatus.FAILED
    assert "object 7 was lost" in sim.resolved[second_reader][0].reason
    sim.assert_each_resolved_once()


HOSTS = {"a0": "a", "a1": "a", "b0": "b", "c0": "c"}

actions = st.one_of(
    st.tuples(st.just("submit"), st.lists(st.integers(0, 50), max_size=2), st.lists(st.integers(0, 50), max_size=2)),
    st.tuples(st.just("keep"), st.lists(st.integers(0, 50), max_size=2)),
    st.tuples(st.just("start"), st.sampled_from(sorted(HOSTS))),
    st.tuples(
        st.just("finish"),
        st.sampled_from(sorted(HOSTS)),
        st.sampled_from([Outcome.OK, Outcome.OK, Outcome.OK, Outcome.ERROR, Outcome.CRASHED]),
    ),
    st.tuples(st.just("answer"), st.sampled_from(sorted(HOSTS))),
    st.tuples(st.just("deliver"), st.sampled_from(sorted(HOSTS))),
    st.tuples(st.just("lose_host"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("rejoin"), st.sampled_from(sorted(HOSTS))),
    st.tuples(st.just("cancel"), st.integers(0, 200)),
    st.tuples(st.just("release"), st.integers(0, 50)),
)


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, max_size=100), st.integers(0, 3))
def test_random_pipelines_under_faults_resolve_each_task_once_and_never_hang(steps: list[tuple], seed: int) -> None:
    config = SchedulerConfig(initial_window=2, min_window=1, max_window=3, story_length=500, locality_slack=1)
    sim = Sim(Scheduler(config, seed=seed))
    for slot_id, host_id in HOSTS.items():
        sim.add_slot(slot_id, host_id=host_id)
    objects: list[int] = []
    for step in steps:
        kind = step[0]
        if kind in ("submit", "keep"):
            # a task can only name tasks and objects that exist already: no cycles by construction
            after = tuple(sim.submitted[i % len(sim.submitted)] for i in step[1]) if sim.submitted else ()
            reads = tuple(objects[i % len(objects)] for i in step[2]) if kind == "submit" and objects else ()
            keep_as = 1000 + len(objects) if kind == "keep" else 0
            if keep_as:
                objects.append(keep_as)
            sim.submit(after=tuple(dict.fromkeys(after)), reads=tuple(dict.fromkeys(reads)), keep_as=keep_as)
        elif kind == "start":
            sim.start(step[1])
        elif kind == "finish":
            sim.finish(step[1], outcome=step[2])
        elif kind == "answer":
            sim.answer_steals(step[1])
        elif kind == "deliver":
            if sim.slots[step[1]].up:
                sim.deliver(step[1])
        elif kind == "lose_host":
            sim.lose_host(step[1])
        elif kind == "rejoin":
            if not sim.slots[step[1]].up:
                sim.rejoin(step[1])
        elif kind == "cancel":
            if sim.submitted:
                sim.handle(ev.CancelRequested(task_id=sim.submitted[step[1] % len(sim.submitted)]))
        elif kind == "release" and objects:
            # as the pool does: only an object that no unresolved task reads is released
            object_id = objects[step[1] % len(objects)]
            readers = [t for t, reads in sim.reads_of.items() if object_id in reads and t not in sim.resolved]
            if not readers:
                sim.handle(ev.ObjectReleased(object_id=object_id))
        sim.sched.validate()
        for task_id, resolutions in sim.resolved.items():
            assert len(resolutions) == 1, f"task {task_id} resolved twice: {resolutions}"

    for slot_id, slot in sim.slots.items():
        if not slot.up:
            sim.rejoin(slot_id)
    sim.run_to_completion()
    sim.sched.validate()
    sim.assert_each_resolved_once()  # remakes included: nothing waits forever
    assert sim.sched.queued == 0 and sim.sched.in_flight == 0 and sim.sched.waiting == 0
