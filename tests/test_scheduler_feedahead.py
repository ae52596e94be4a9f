"""Feed-ahead (core/feedahead.py): a dependent sent behind the tasks making its inputs, and what
happens to it when they fail, crash, are cancelled or lost; and a property over random chains
under faults, against fake slots that hold kept values as slot processes do."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batuta.core import events as ev
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Outcome, TaskStatus
from tests.scheduler_sim import Sim


class ObjectSim(Sim):
    """Fake slots that keep results as slot processes do: a kept result lives in the process
    that made it; a task whose input was never made answers "error" (as a slot does), one
    whose input was made and lost answers "crashed" (as the agent does); a crash loses the
    process's values, reported before the outcome (`KeptObjectsLost`)."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.keep_of: dict[int, int] = {}  # task id -> the object it keeps
        self.held: dict[str, set[int]] = {}  # slot -> objects its process holds
        self.ever_made: set[int] = set()

    def submit(self, *, keep_as: int = 0, **kwargs: object) -> int:
        task_id = self._next_id
        self.keep_of[task_id] = keep_as
        return super().submit(keep_as=keep_as, **kwargs)  # type: ignore[arg-type]

    def finish(
        self, slot_id: str, outcome: Outcome = Outcome.OK, run_s: float = 0.01, kept_bytes: int = 4 << 20
    ) -> int | None:
        slot = self.slots[slot_id]
        if not slot.up or slot.running is None:
            return None
        task_id = slot.running[0]
        reads = self.reads_of.get(task_id, ())
        anywhere = set().union(*self.held.values()) if self.held else set()
        missing = [o for o in reads if o not in anywhere]
        if outcome is Outcome.OK and missing:
            outcome = Outcome.CRASHED if any(o in self.ever_made for o in missing) else Outcome.ERROR
        if outcome is Outcome.CRASHED:
            lost = self.held.pop(slot_id, set())
            if lost:
                slot.outbox.append(
                    ev.KeptObjectsLost(host_id=slot.host_id, object_ids=tuple(sorted(lost)), reason="crash")
                )
        finished = super().finish(slot_id, outcome, run_s, kept_bytes)
        if outcome is Outcome.OK:
            if self.keep_of.get(task_id):
                self.held.setdefault(slot_id, set()).add(self.keep_of[task_id])
                self.ever_made.add(self.keep_of[task_id])
        elif outcome is Outcome.ERROR and missing:
            slot.outbox[-1] = ev.TaskOutcomeReported(
                task_id=task_id,
                slot_id=slot_id,
                attempt=slot.outbox[-1].attempt,  # type: ignore[union-attr]
                outcome=Outcome.ERROR,
                reason=f"slot {slot_id} was not sent object(s) {missing}",
            )
        return finished

    def lose_host(self, host_id: str, reason: str = "killed") -> None:
        for slot_id, slot in self.slots.items():
            if slot.host_id == host_id:
                self.held.pop(slot_id, None)
        super().lose_host(host_id, reason)


def object_sim(hosts: dict[str, str], **config: object) -> ObjectSim:
    sim = ObjectSim(Scheduler(SchedulerConfig(story_length=500, **config), seed=0))  # type: ignore[arg-type]
    for slot_id, host_id in hosts.items():
        sim.add_slot(slot_id, host_id=host_id)
    return sim


def step(sim: Sim, slot_id: str, outcome: Outcome = Outcome.OK) -> int | None:
    """The slot runs the task at the head of its queue and its agent reports it."""
    sim.start(slot_id)
    task_id = sim.finish(slot_id, outcome=outcome)
    sim.deliver(slot_id)
    return task_id


def slot_of(sim: Sim, task_id: int) -> str:
    where = sim.sched.where(task_id)
    assert where is not None and where[0] == "window" and where[1] is not None
    return where[1]


def sends(sim: Sim) -> list[ev.SendTasks]:
    return [i for i in sim.instructions if isinstance(i, ev.SendTasks)]


def test_a_chain_goes_to_its_producers_slot_at_once_and_each_stage_reads_what_the_one_before_made() -> None:
    sim = object_sim({"a0": "a", "b0": "b"})
    first = sim.submit(keep_as=1)
    second = sim.submit(reads=(1,), keep_as=2)
    third = sim.submit(reads=(2,))
    home = sim.sched.where(first)
    assert home is not None and home[0] == "window"
    assert sim.sched.where(second) == home and sim.sched.where(third) == home  # not waiting
    assert sim.sched.stats.fed_ahead == 2 and sim.sched.waiting == 0
    made = {o for s in sends(sim) for o in s.made_ahead}
    assert made == {1, 2}  # the runtime is told not to send or fetch them
    slot_id = home[1]
    assert slot_id is not None
    assert [t for t, _ in sim.slots[slot_id].queue] == [first, second, third]  # in order, one slot
    sim.sched.validate()
    for _ in range(3):
        step(sim, slot_id)
        sim.sched.validate()
    assert all(sim.status_of(t) is TaskStatus.SUCCEEDED for t in (first, second, third))
    assert sim.sched.stats.fed_ahead_returned == 0


def test_a_chain_longer_than_the_window_is_fed_in_as_the_window_frees() -> None:
    sim = object_sim({"a0": "a"}, initial_window=2, min_window=2, max_window=2)
    stages = [sim.submit(keep_as=1)] + [sim.submit(reads=(i,), keep_as=i + 1) for i in range(1, 6)]
    assert [sim.sched.where(t) for t in stages] == [("window", "a0")] * 2 + [("waiting", None)] * 4
    for done in range(1, 6):
        step(sim, "a0")
        # each result frees a place, taken by the next stage at once, behind the one making its input
        assert sim.sched.where(stages[done + 1] if done + 1 < len(stages) else stages[-1]) == ("window", "a0")
        sim.sched.validate()
    step(sim, "a0")
    assert all(sim.status_of(t) is TaskStatus.SUCCEEDED for t in stages)
    assert sim.sched.stats.fed_ahead == 5


def test_a_chain_fills_the_window_past_its_limit_but_readers_sharing_a_value_do_not() -> None:
    # window sized for the round trip: 2; a chain's stages can run nowhere sooner, so up to
    # max_window go behind each other at once (no round trip per stage on a GPU)
    sim = object_sim({"a0": "a", "b0": "b"}, initial_window=2, min_window=2, max_window=5)
    stages = [sim.submit(keep_as=1)] + [sim.submit(reads=(i,), keep_as=i + 1) for i in range(1, 7)]
    home = slot_of(sim, stages[0])
    assert [sim.sched.where(t) for t in stages] == [("window", home)] * 5 + [("waiting", None)] * 2
    sim.sched.validate()
    # a value read by several tasks: they keep to the window's limit, the others wait for it
    # and then spread (the other host may take them once it is made)
    sim2 = object_sim({"a0": "a", "b0": "b"}, initial_window=2, min_window=2, max_window=5)
    made = sim2.submit(keep_as=1)
    readers = [sim2.submit(reads=(1,)) for _ in range(4)]
    there = slot_of(sim2, made)
    assert [sim2.sched.where(t) for t in readers] == [("window", there)] + [("waiting", None)] * 3
    sim2.sched.validate()


def test_what_keeps_a_dependent_waiting_an_upstream_value_other_capabilities_a_full_window_or_off() -> None:
    sim = object_sim({"a0": "a"}, initial_window=2, min_window=2, max_window=2)
    made = sim.submit(keep_as=1)
    plain = sim.submit()
    needs_both = sim.submit(reads=(1,), after=(plain,))  # plain's value comes through the coordinator
    needs_gpu = sim.submit(reads=(1,), requires=("gpu",))  # the slot cannot run it (nor any other)
    assert sim.sched.where(needs_both) == ("waiting", None)
    assert sim.status_of(needs_gpu) is TaskStatus.UNSCHEDULABLE
    full = sim.submit(reads=(1,))  # the window holds `made` and `plain`: no room
    assert sim.sched.where(full) == ("waiting", None)
    assert step(sim, "a0") == made
    assert sim.sched.where(full) == ("window", "a0")  # room now, and its input is there anyway
    assert sim.sched.stats.fed_ahead == 0
    off = object_sim({"a0": "a"}, feed_ahead=False)
    off.submit(keep_as=1)
    assert off.sched.where(off.submit(reads=(1,))) == ("waiting", None)


def test_a_producer_that_fails_fails_its_fed_ahead_dependents_naming_it_and_their_late_answers_are_dropped() -> None:
    sim = object_sim({"a0": "a"})
    bad = sim.submit(keep_as=1)
    reader = sim.submit(reads=(1,), keep_as=2)
    reader_of_reader = sim.submit(reads=(2,))
    assert sim.sched.where(reader_of_reader) == ("window", "a0")
    step(sim, "a0", Outcome.ERROR)
    assert sim.status_of(bad) is TaskStatus.FAILED
    for doomed in (reader, reader_of_reader):
        [resolution] = sim.resolved[doomed]
        assert resolution.status is TaskStatus.FAILED
        assert "object 1" in resolution.reason and f"task {bad}" in resolution.reason
    # the agent answers for them itself (their input was never made): no abort is needed
    assert not [i for i in sim.instructions if isinstance(i, ev.AbortTasks)]
    dropped = sim.sched.stats.dropped_results
    step(sim, "a0")  # "was not sent object 1": a zombie's answer, ending nothing twice
    step(sim, "a0")
    sim.sched.validate()
    assert sim.sched.in_flight == 0 and sim.sched.stats.dropped_results == dropped
    sim.assert_each_resolved_once()


def test_cancelling_a_producer_cancels_and_aborts_its_fed_ahead_dependent() -> None:
    sim = object_sim({"a0": "a"})
    made = sim.submit(keep_as=1)
    reader = sim.submit(reads=(1,))
    sim.start("a0")
    sim.handle(ev.CancelRequested(task_id=made))
    assert sim.status_of(reader) is TaskStatus.CANCELLED
    assert f"input object 1: its producer, task {made}, cancelled" in sim.resolved[reader][0].reason
    aborted = {t for i in sim.instructions if isinstance(i, ev.AbortTasks) for t in i.task_ids}
    assert aborted == {made, reader}  # the producer may have made its value there: stop the reader
    sim.run_to_completion()
    sim.sched.validate()
    sim.assert_each_resolved_once()
    assert sim.sched.in_flight == 0


def test_a_producer_whose_worker_crashed_runs_again_and_its_dependent_waits_for_that_run() -> None:
    sim = object_sim({"a0": "a"})
    made = sim.submit(keep_as=1)
    reader = sim.submit(reads=(1,))
    assert step(sim, "a0", Outcome.CRASHED) == made  # requeued, and sent to a0 again behind the reader
    assert sim.sched.where(made) == ("window", "a0")
    assert step(sim, "a0") == reader  # the slot had nothing to give it: "error", which is not its result
    assert reader not in sim.resolved and sim.sched.stats.fed_ahead_returned == 1
    assert sim.sched.where(reader) == ("window", "a0")  # fed ahead again, behind the new run
    assert sim.sched.attempts(reader) == 2  # its agent reported the void attempt started: it counts
    sim.sched.validate()
    sim.run_to_completion()
    assert sim.status_of(made) is TaskStatus.SUCCEEDED and sim.status_of(reader) is TaskStatus.SUCCEEDED
    assert sim.sched.stats.fed_ahead == 2
    sim.assert_each_resolved_once()


def test_a_dependent_whose_producer_ran_again_elsewhere_goes_there_after_its_void_attempt() -> None:
    sim = object_sim({"a0": "a", "b0": "b"}, initial_window=2, min_window=2, max_window=2, tail_tasks_per_slot=0)
    made = sim.submit(keep_as=1)
    slot_id = slot_of(sim, made)
    other = "b0" if slot_id == "a0" else "a0"
    reader = sim.submit(reads=(1,))
    assert sim.sched.where(reader) == ("window", slot_id)
    sim.start(slot_id)
    sim.finish(slot_id, Outcome.CRASHED)
    filler = sim.submit()  # to the other slot: the crashed one's window is full until its report
    sim.deliver(slot_id)
    assert sim.sched.where(made) == ("window", other)  # the rerun goes where there was room
    step(sim, other)
    assert step(sim, other) == made  # made there, before the reader's void answer comes back
    assert sim.sched.where(reader) == ("window", slot_id)
    step(sim, slot_id)  # its answer ("error": the value is not in that process) is not its result
    assert reader not in sim.resolved and sim.sched.where(reader) is not None
    sim.run_to_completion()
    assert sim.status_of(reader) is TaskStatus.SUCCEEDED and sim.status_of(filler) is TaskStatus.SUCCEEDED
    assert sim.resolved[reader][0].slot_id == other  # where its input is
    sim.assert_each_resolved_once()


def test_a_fed_ahead_dependent_is_not_stolen_back_until_its_input_is_made_and_then_only_on_its_host() -> None:
    sim = object_sim({"a0": "a"})
    made = sim.submit(keep_as=1)
    first, second = sim.submit(reads=(1,)), sim.submit(reads=(1,))
    sim.add_slot("a1", host_id="a")  # idle: looks for work to take back
    sim.add_slot("b0", host_id="b")
    assert not [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]  # nothing may move yet
    step(sim, "a0")  # the input is made: the readers are tasks like any other now
    assert sim.start("a0") == first
    sim.deliver("a0")
    sim.handle(ev.SchedulingPaused())
    sim.handle(ev.SchedulingResumed())  # the idle slots look again
    [request] = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert request.slot_id == "a0" and request.task_ids == (second,)
    sim.answer_steals("a0")
    sim.deliver("a0")
    sim.run_to_completion()
    assert sim.status_of(made) is TaskStatus.SUCCEEDED
    assert sim.resolved[second][0].slot_id == "a1"  # the thief on the host holding its input
    sim.assert_each_resolved_once()


def test_a_producer_taken_back_by_an_idle_slot_takes_its_fed_ahead_dependent_along() -> None:
    sim = object_sim({"a0": "a"})
    busy = sim.submit()
    made = sim.submit(keep_as=1)
    reader = sim.submit(reads=(1,))
    assert sim.start("a0") == busy
    sim.deliver("a0")
    sim.add_slot("a1", host_id="a")  # idle: asks for the producer, waiting behind a running task
    [request] = [i for i in sim.instructions if isinstance(i, ev.RequestStealBack)]
    assert request.task_ids == (made,)  # not the reader: it could run nowhere sooner
    sim.answer_steals("a0")
    sim.deliver("a0")
    assert sim.sched.where(made) == ("window", "a1") and sim.sched.where(reader) == ("window", "a0")
    sim.sched.validate()
    sim.finish("a0")
    sim.deliver("a0")
    assert step(sim, "a0") == reader  # void there: "error", its input is made on a1
    assert reader not in sim.resolved and sim.sched.where(reader) == ("window", "a1")  # behind it again
    sim.run_to_completion()
    assert sim.status_of(reader) is TaskStatus.SUCCEEDED and sim.resolved[reader][0].slot_id == "a1"
    assert sim.sched.stats.fed_ahead == 2 and sim.sched.stats.fed_ahead_returned == 1
    sim.assert_each_resolved_once()


def test_a_lost_host_sends_a_fed_ahead_chain_back_to_waiting_and_then_behind_the_rerun() -> None:
    sim = object_sim({"a0": "a", "b0": "b"})
    made = sim.submit(keep_as=1, max_attempts=3)
    slot_id = slot_of(sim, made)
    lost_host = sim.slots[slot_id].host_id
    reader = sim.submit(reads=(1,), keep_as=2)
    last = sim.submit(reads=(2,))
    sim.start(slot_id)
    sim.deliver(slot_id)
    sim.lose_host(lost_host)
    survivor = next(s for s, slot in sim.slots.items() if slot.up)
    for task_id in (made, reader, last):  # the producer requeued, its chain fed ahead behind it again
        assert sim.sched.where(task_id) == ("window", survivor)
    sim.sched.validate()
    sim.run_to_completion()
    assert all(sim.status_of(t) is TaskStatus.SUCCEEDED for t in (made, reader, last))
    sim.assert_each_resolved_once()


def test_a_chain_on_a_value_lost_with_its_host_waits_for_the_remake_then_follows_it() -> None:
    sim = object_sim({"a0": "a", "b0": "b"})
    made = sim.submit(keep_as=1, max_attempts=3)
    slot_id = slot_of(sim, made)
    step(sim, slot_id)
    sim.lose_host(sim.slots[slot_id].host_id)
    [remake] = sim.remade
    assert remake.object_id == 1 and remake.task_id == made
    rerun = sim.submitted[-1]
    survivor = next(s for s, slot in sim.slots.items() if slot.up)
    reader = sim.submit(reads=(1,))
    assert sim.sched.where(rerun) == ("window", survivor) and sim.sched.where(reader) == ("window", survivor)
    sim.run_to_completion()
    assert sim.status_of(rerun) is TaskStatus.SUCCEEDED and sim.status_of(reader) is TaskStatus.SUCCEEDED


HOSTS = {"a0": "a", "a1": "a", "b0": "b"}
SLOTS = sorted(HOSTS)
OUTCOMES = [Outcome.OK, Outcome.OK, Outcome.CRASHED]

# (weight, action): chains grow and run more often than hosts are lost
WEIGHTED: list[tuple[int, st.SearchStrategy[tuple]]] = [
    (6, st.tuples(st.just("stage"), st.integers(0, 3), st.booleans())),  # reads one of the last objects
    (2, st.tuples(st.just("source"), st.booleans())),  # a kept task reading nothing
    (6, st.tuples(st.just("run"), st.sampled_from(SLOTS), st.sampled_from(OUTCOMES))),  # start, finish, report
    (1, st.tuples(st.just("start"), st.sampled_from(SLOTS))),
    (1, st.tuples(st.just("finish"), st.sampled_from(SLOTS), st.sampled_from(OUTCOMES))),
    (2, st.tuples(st.just("deliver"), st.sampled_from(SLOTS))),
    (1, st.tuples(st.just("answer"), st.sampled_from(SLOTS))),
    (1, st.tuples(st.just("nudge"))),  # pause and resume: idle slots look for work to take back
    (1, st.tuples(st.just("cancel"), st.integers(0, 100))),
    (1, st.tuples(st.just("lose_host"), st.sampled_from(["a", "b"]))),
    (1, st.tuples(st.just("rejoin"), st.sampled_from(SLOTS))),
]
actions = st.sampled_from([action for weight, action in WEIGHTED for _ in range(weight)]).flatmap(lambda a: a)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=10, max_size=80), st.integers(0, 3))
def test_random_chains_under_faults_only_fail_for_a_loss_and_never_run_without_their_input(
    steps: list[tuple], seed: int
) -> None:
    """No task is given an "error", so a task may end FAILED only after something upstream was
    lost or cancelled; a fed-ahead task that ran before its input existed, and whose answer
    was taken for its result, would fail with the slot's "was not sent object" instead."""
    config = SchedulerConfig(initial_window=3, min_window=1, max_window=4, story_length=500)
    sim = ObjectSim(Scheduler(config, seed=seed))
    for slot_id, host_id in HOSTS.items():
        sim.add_slot(slot_id, host_id=host_id)
    objects: list[int] = []
    for action in steps:
        kind = action[0]
        if kind in ("stage", "source"):
            keep = action[-1]
            reads = (objects[-1 - action[1] % len(objects)],) if kind == "stage" and objects else ()
            keep_as = 100 + len(objects) if keep else 0
            if keep_as:
                objects.append(keep_as)
            sim.submit(reads=reads, keep_as=keep_as, max_attempts=6)
        elif kind == "start":
            sim.start(action[1])
        elif kind == "finish":
            sim.finish(action[1], outcome=action[2])
        elif kind == "run":  # start, finish and report
            sim.start(action[1])
            sim.finish(action[1], outcome=action[2])
            if sim.slots[action[1]].up:
                sim.deliver(action[1])
        elif kind == "answer":
            sim.answer_steals(action[1])
        elif kind == "deliver":
            if sim.slots[action[1]].up:
                sim.deliver(action[1])
        elif kind == "lose_host":
            sim.lose_host(action[1])
        elif kind == "rejoin":
            if not sim.slots[action[1]].up:
                sim.rejoin(action[1])
        elif kind == "cancel" and sim.submitted:
            sim.handle(ev.CancelRequested(task_id=sim.submitted[action[1] % len(sim.submitted)]))
        elif kind == "nudge":
            sim.handle(ev.SchedulingPaused())
            sim.handle(ev.SchedulingResumed())
        sim.sched.validate()
    for slot_id, slot in sim.slots.items():
        if not slot.up:
            sim.rejoin(slot_id)
    sim.run_to_completion()
    sim.sched.validate()
    sim.assert_each_resolved_once()
    assert sim.sched.queued == 0 and sim.sched.in_flight == 0 and sim.sched.waiting == 0
    for task_id, [resolution] in sim.resolved.items():
        if resolution.status is TaskStatus.FAILED:
            why = resolution.reason
            assert "lost" in why or "cancelled" in why, (task_id, why, sim.sched.story(task_id))
