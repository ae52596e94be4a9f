"""`SlotSupervisor` against a slot the test plays itself: the supervisor's pipes lead to the
test, which reads the `Run`/`Cancel` frames it is fed and answers with `SlotChanged`/`Done`.

That pins down the rules of `supervisor.py` exactly -- feed depth, when a start is inferred,
what steal-back returns, where a fed task's cancel goes, what "down" means -- without the
timing of a real slot process. The "process" is a `sleep` in its own session, so the
supervisor's kills hit something real; it is killed by PID afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from batuta.agent import supervisor
from batuta.agent.supervisor import SlotSupervisor
from batuta.core.objects import ObjectRef
from batuta.core.task import KernelCall, Outcome
from batuta.protocol.codec import FrameDecoder, encode_message
from batuta.protocol.messages import (
    SLOT_DOWN,
    SLOT_RESTARTING,
    SLOT_UP,
    Cancel,
    Done,
    GpuCache,
    Message,
    Run,
    SlotChanged,
    SlotInfo,
    TaskOutcome,
    TaskRequest,
)


@dataclass
class Recorder:
    """The agent's side of `SlotEvents`, recorded; `changed` wakes waiters."""

    started: list[int] = field(default_factory=list)
    finished: list[TaskOutcome] = field(default_factory=list)
    states: list[SlotChanged] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def task_started(self, task_id: int) -> None:
        self.started.append(task_id)
        self.changed.set()

    def task_finished(self, outcome: TaskOutcome) -> None:
        self.finished.append(outcome)
        self.changed.set()

    def slot_changed(self, state: SlotChanged) -> None:
        self.states.append(state)
        self.changed.set()

    def outcome(self, task_id: int) -> TaskOutcome | None:
        return next((o for o in self.finished if o.task_id == task_id), None)

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class FakeSlot:
    """The far end of one spawned "slot process"."""

    def __init__(self, proc: subprocess.Popen[bytes], frames_in: int, frames_out: int, stderr: int) -> None:
        self.proc = proc
        self.frames_in = frames_in  # what the supervisor writes
        self.frames_out = frames_out  # what the supervisor reads
        self.stderr = stderr  # what the supervisor reads as the process's stderr
        self.decoder = FrameDecoder()
        os.set_blocking(frames_in, False)

    def received(self) -> list[Message]:
        """Every frame the supervisor has written so far (its writes are synchronous)."""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.frames_in, 1 << 20):
                self.decoder.feed(data)
        messages = []
        while (message := self.decoder.next_message()) is not None:
            messages.append(message)
        return messages

    def fed_ids(self) -> list[list[int]]:
        return [[t.task_id for t in m.tasks] for m in self.received() if isinstance(m, Run)]

    def send(self, message: Message) -> None:
        os.write(self.frames_out, encode_message(message))

    def ready(self) -> None:
        self.send(SlotChanged(slot=0, state=SLOT_UP))

    def done(self, task_id: int, run_s: float = 1e-5, status: Outcome = Outcome.OK) -> None:
        self.send(Done(results=(TaskOutcome(task_id=task_id, slot=0, attempt=1, status=status, run_s=run_s),)))

    def say(self, text: str) -> None:
        """Write `text` to the "process's" stderr."""
        os.write(self.stderr, text.encode())

    def close(self) -> None:
        for fd in (self.frames_in, self.frames_out, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Bench:
    slot: SlotSupervisor
    events: Recorder
    spawned: list[FakeSlot]
    failing: list[bool]

    @property
    def fake(self) -> FakeSlot:
        return self.spawned[-1]


@pytest.fixture
async def bench(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bench]:
    spawned: list[FakeSlot] = []
    failing = [False]

    def fake_spawn_slot(**_: Any) -> tuple[subprocess.Popen[bytes], int, int, int]:
        if failing[0]:
            raise OSError("no more processes (test)")
        to_slot_r, to_slot_w = os.pipe()
        from_slot_r, from_slot_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        spawned.append(FakeSlot(proc, to_slot_r, from_slot_w, stderr_w))
        events.changed.set()  # a (re)start wakes waiters too
        return proc, to_slot_w, from_slot_r, stderr_r

    monkeypatch.setattr(supervisor, "spawn_slot", fake_spawn_slot)
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_S", (0.0, 0.0, 0.0, 0.0, 0.0))
    events = Recorder()
    slot = SlotSupervisor(
        info=SlotInfo(slot=0, capabilities=("cpu",)),
        env={},
        kernel_modules=(),
        events=events,
        loop=asyncio.get_running_loop(),
    )
    try:
        yield Bench(slot, events, spawned, failing)
    finally:
        slot.close()
        for fake in spawned:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fake.proc.pid, signal.SIGKILL)
            fake.proc.wait(10)
            fake.close()


def task(task_id: int, timeout: float | None = None) -> TaskRequest:
    return TaskRequest(task_id=task_id, slot=0, attempt=1, call=KernelCall(name="noop"), timeout=timeout)


def enqueue(slot: SlotSupervisor, *ids: int, timeout: float | None = None) -> None:
    for task_id in ids:
        slot.enqueue(task(task_id, timeout))
    slot.pump()


async def test_feeds_one_until_run_times_are_known_then_deeper(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    enqueue(slot, *range(1, 41))
    fake = bench.fake
    assert fake.fed_ids() == [[1]]  # depth 1 until a run time is known
    assert events.started == []  # not ready: nothing has started
    fake.ready()
    await events.until(lambda: events.started == [1])
    fake.done(1, run_s=1e-5)  # 10 us: depth 1 + min(31, 100) = 32
    await events.until(lambda: events.started == [1, 2])
    assert fake.fed_ids() == [list(range(2, 34))]
    assert [t.task_id for t in slot.queue] == list(range(34, 41))
    for task_id in range(2, 6):
        fake.done(task_id, run_s=1e-5)
    await events.until(lambda: events.started[-1] == 6)
    assert events.started == [1, 2, 3, 4, 5, 6]
    assert fake.fed_ids() == [[34, 35, 36, 37]]  # topped back up to 32


async def test_slow_tasks_are_fed_one_at_a_time(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    bench.fake.ready()
    enqueue(slot, 1, 2, 3)
    await events.until(lambda: events.started == [1])
    bench.fake.done(1, run_s=0.05)
    await events.until(lambda: events.started == [1, 2])
    assert bench.fake.fed_ids() == [[1], [2]]
    assert [t.task_id for t in slot.queue] == [3]


async def test_short_tasks_get_one_more_fed_behind_them(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    bench.fake.ready()
    enqueue(slot, 1, 2, 3, 4)
    await events.until(lambda: events.started == [1])
    bench.fake.done(1, run_s=4e-3)
    await events.until(lambda: events.started == [1, 2])
    assert [i for batch in bench.fake.fed_ids() for i in batch] == [1, 2, 3]
    assert [t.task_id for t in slot.queue] == [4]


async def test_tail_tasks_wait_unfed_until_the_slot_is_idle_and_stay_stealable(bench: Bench) -> None:
    """A task sent as a tail task (`core/tailfeed.py`) is not fed behind the running one,
    whatever the depth: a steal-back still takes it; one left is fed once the slot is idle,
    and each task is answered once."""
    slot, events = bench.slot, bench.events
    slot.start()
    fake = bench.fake
    fake.ready()
    enqueue(slot, 1)
    await events.until(lambda: events.started == [1])
    fake.done(1, run_s=4e-3)  # short tasks: depth 2, one fed behind the running one
    await events.until(lambda: events.outcome(1) is not None)
    enqueue(slot, 2)
    for task_id in (3, 4):
        slot.enqueue(TaskRequest(task_id=task_id, slot=0, attempt=1, call=KernelCall(name="noop"), tail=True))
    slot.pump()
    await events.until(lambda: events.started == [1, 2])
    assert [i for batch in fake.fed_ids() for i in batch] == [1, 2]  # 3 and 4 wait here
    assert [t.task_id for t in slot.queue] == [3, 4]
    assert slot.steal_back([4]) == ((4,), ())  # an idle slot elsewhere takes it back
    fake.done(2, run_s=4e-3)
    await events.until(lambda: events.started == [1, 2, 3])
    assert fake.fed_ids() == [[3]]  # fed alone, to the idle process
    fake.done(3, run_s=4e-3)
    await events.until(lambda: events.outcome(3) is not None)
    assert sorted(o.task_id for o in events.finished) == [1, 2, 3]
    assert not slot.holds(4) and not slot.queue and not slot.fed


async def test_a_chains_next_stages_are_fed_past_the_depth(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    bench.fake.ready()
    x = ObjectRef(1)
    chain = [TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="noop", args=(x,)), keep=11)] + [
        TaskRequest(task_id=i, slot=0, attempt=1, call=KernelCall(name="noop", args=(ObjectRef(9 + i),)), keep=10 + i)
        for i in range(2, 5)
    ]
    slot._values.held.add(1)  # the process holds the chain's input
    for request in [*chain, task(5)]:
        slot.enqueue(request)
    slot.pump()
    await events.until(lambda: events.started == [1])
    # depth 1 (no run time known yet), but each stage reads what the one before it keeps: all
    # go to the process at once; the unrelated task behind them waits here, stealable
    assert [i for batch in bench.fake.fed_ids() for i in batch] == [1, 2, 3, 4]
    assert [t.task_id for t in slot.queue] == [5]


async def test_steal_back_returns_only_unfed_tasks(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    bench.fake.ready()
    enqueue(slot, 1, 2, 3, 4)
    await events.until(lambda: events.started == [1])
    returned, refused = slot.steal_back([4, 1, 2, 99])
    assert returned == (4, 2)
    assert refused == (1, 99)
    assert [t.task_id for t in slot.queue] == [3]
    assert not slot.holds(4) and slot.holds(3) and slot.holds(1)


async def test_cancel_of_a_fed_task_goes_to_the_slot(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    fake = bench.fake
    fake.ready()
    enqueue(slot, 1)
    await events.until(lambda: events.started == [1])
    fake.done(1, run_s=1e-5)
    await events.until(lambda: events.outcome(1) is not None)
    enqueue(slot, 2, 3, 4)
    await events.until(lambda: events.started == [1, 2])
    fake.received()
    slot.cancel([3, 4])
    assert [m for m in fake.received() if isinstance(m, Cancel)] == [Cancel(task_ids=(3, 4))]
    assert events.outcome(3) is None  # answered by the slot, not yet
    fake.send(
        Done(
            results=(
                TaskOutcome(task_id=3, slot=0, attempt=1, status=Outcome.CANCELLED),
                TaskOutcome(task_id=4, slot=0, attempt=1, status=Outcome.CANCELLED),
            )
        )
    )
    await events.until(lambda: events.outcome(4) is not None)
    fake.done(2)
    await events.until(lambda: events.outcome(2) is not None)
    assert [o.status for o in events.finished] == [Outcome.OK, Outcome.CANCELLED, Outcome.CANCELLED, Outcome.OK]


async def test_timeout_kills_restarts_and_refeeds(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    first = bench.fake
    first.ready()
    enqueue(slot, 1)
    await events.until(lambda: events.started == [1])
    first.done(1, run_s=1e-5)
    enqueue(slot, 2, 3, timeout=0.2)
    await events.until(lambda: events.outcome(2) is not None)
    assert events.outcome(2).status == Outcome.TIMEOUT  # type: ignore[union-attr]
    assert first.proc.wait(10) == -signal.SIGKILL
    assert [(s.state, "timeout" in s.reason) for s in events.states] == [(SLOT_RESTARTING, True)]
    second = bench.fake
    assert second is not first
    assert second.fed_ids() == [[3]]  # re-fed to the new process
    second.ready()
    await events.until(lambda: len(events.states) == 2)
    assert events.states[-1].state == SLOT_UP
    assert events.started[-1] == 3


async def test_death_crashes_the_running_task_and_requeues_the_rest(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    first = bench.fake
    first.ready()
    enqueue(slot, 1)
    first.done(1, run_s=1e-5)
    await events.until(lambda: events.outcome(1) is not None)
    enqueue(slot, 2, 3, 4)
    await events.until(lambda: events.started[-1] == 2)
    first.close()  # the process "died": its pipes close
    await events.until(lambda: events.outcome(2) is not None)
    crashed = events.outcome(2)
    assert crashed is not None and crashed.status == Outcome.CRASHED
    assert "slot 0" in (crashed.error or "")
    second = bench.fake
    assert second is not first and second.fed_ids() == [[3, 4]]
    assert events.outcome(3) is None and events.outcome(4) is None


async def test_repeated_failed_starts_take_the_slot_down(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    enqueue(slot, 1, 2)
    bench.failing[0] = True
    bench.fake.close()  # dies before it is ready; every restart then fails
    await events.until(lambda: any(s.state == SLOT_DOWN for s in events.states))
    assert [s.state for s in events.states] == [SLOT_RESTARTING, SLOT_DOWN]
    assert "failed starts" in events.states[-1].reason
    assert events.finished == []  # nothing had started: handed back unanswered
    assert not slot.holds(1) and not slot.holds(2)
    enqueue(slot, 3)
    assert not slot.holds(3)


async def test_a_slot_that_cannot_start_says_why_with_its_last_line_on_stderr(
    bench: Bench, capfd: pytest.CaptureFixture[str]
) -> None:
    """A slot process that died before it was ready (out of file descriptors, say) was
    reported as "exited with code 70" alone, its reason only among the agent's stderr lines."""
    slot, events = bench.slot, bench.events
    slot.start()
    first = bench.fake
    first.say('Traceback (most recent call last):\n  File "x.py", line 1\nOSError: [Errno 24] Too many ')
    first.say("open files\n\n")
    first.close()  # dies before it is ready
    await events.until(lambda: bool(events.states))
    restarting = events.states[0].reason
    assert restarting.endswith("; its last line on stderr: OSError: [Errno 24] Too many open files"), restarting
    while not any(s.state == SLOT_DOWN for s in events.states):  # each restart fails alike
        spawned = len(bench.spawned)
        bench.fake.say("x" * 10_000)  # one unfinished line, long: kept bounded
        bench.fake.close()
        await events.until(
            lambda spawned=spawned: len(bench.spawned) > spawned or any(s.state == SLOT_DOWN for s in events.states)
        )
    down = events.states[-1].reason
    assert "failed starts" in down and f"stderr: {'x' * 300} … (9,700 more characters)" in down, down
    assert "OSError: [Errno 24] Too many open files\n" in capfd.readouterr().err  # passed on to the agent's stderr


async def test_a_slot_that_dies_after_it_was_ready_gives_no_stderr_line_as_its_reason(bench: Bench) -> None:
    """Once ready, a slot writes to the agent's stderr itself: a line from its start is old."""
    slot, events = bench.slot, bench.events
    slot.start()
    first = bench.fake
    first.say("a warning at start\n")
    first.ready()
    enqueue(slot, 1)
    await events.until(lambda: events.started == [1])
    first.close()
    await events.until(lambda: events.outcome(1) is not None and bool(events.states))
    crashed = events.outcome(1)
    assert crashed is not None and crashed.status == Outcome.CRASHED
    assert "stderr" not in (crashed.error or "") and "stderr" not in events.states[0].reason, events.states


async def test_a_gpu_cache_report_is_kept_until_its_process_goes(bench: Bench) -> None:
    slot, events = bench.slot, bench.events
    slot.start()
    bench.fake.ready()
    enqueue(slot, 1)
    await events.until(lambda: events.started == [1])
    assert slot.gpu_cache is None
    cache = GpuCache(slot=0, values=2, nbytes=5 << 20, cap=1 << 30)
    bench.fake.send(cache)  # before its result, on the same pipe: read first
    bench.fake.done(1)
    await events.until(lambda: events.outcome(1) is not None)
    assert slot.gpu_cache == cache
    bench.fake.send(GpuCache(slot=3, values=1, nbytes=1, cap=1))  # another slot's: the stream is corrupt
    await events.until(lambda: [s.state for s in events.states] == [SLOT_RESTARTING])
    assert slot.gpu_cache is None and len(bench.spawned) == 2  # its card memory went with the process
