"""The host agent end to end: a real `python -m batuta.agent --stdio` subprocess, driven by a
coordinator-side `Connection` over its stdin/stdout (see `test_agent_harness.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from batuta.agent.telemetry import fake_gpu_sample
from batuta.core.objects import ObjectRef
from batuta.core.task import Outcome
from batuta.protocol.codec import encode_message
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    SLOT_RESTARTING,
    SLOT_UP,
    Bye,
    Cancel,
    Drop,
    Error,
    Hello,
    Keepalive,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    StealBack,
    StealBackReply,
    Welcome,
)
from tests.test_agent_harness import (
    BOTH_SPAWN_MODES,
    StartAgent,
    binary_task,
    kernel_env,
    kernel_task,
    start_agent,
    still_alive,
)

__all__ = ["kernel_env", "start_agent"]  # fixtures, imported to be found by pytest


def _fifo(tmp_path: Path, name: str = "pid.fifo") -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


async def _read_fifo_line(path: Path, timeout: float = 20.0) -> str:
    """Wait (without polling) for a writer to put one line into the FIFO at `path`."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = bytearray()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        async with asyncio.timeout(timeout):
            while b"\n" not in data:
                await ready.wait()
                ready.clear()
                with contextlib.suppress(BlockingIOError):
                    data += os.read(fd, 4096)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return data.decode().strip()


# -- handshake ----------------------------------------------------------------------------


async def test_hello_describes_the_host(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "3", "--gpus", "none", "--name", "node-a")
    hello = agent.hello
    assert hello is not None
    assert hello.hostname == "node-a"
    assert hello.pid == agent.proc.pid
    assert [s.slot for s in hello.slots] == [0, 1, 2]
    assert all(s.capabilities == ("cpu",) and s.gpu_index is None for s in hello.slots)
    assert hello.cpu_count == os.cpu_count()
    assert hello.python_version == "{}.{}.{}".format(*sys.version_info[:3])
    assert {"msgpack", "psutil", "numpy"} <= set(hello.packages)


async def test_default_slot_count_is_cpu_count(start_agent: StartAgent) -> None:
    agent = await start_agent("--gpus", "none")
    assert agent.hello is not None
    assert len(agent.hello.slots) == os.cpu_count()


@BOTH_SPAWN_MODES
async def test_fake_gpus_give_gpu_slots_and_gpu_telemetry(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", env={"BATUTA_FAKE_GPUS": "2"}, heartbeat_interval=0.05)
    hello = agent.hello
    assert hello is not None
    assert [g.index for g in hello.gpus] == [0, 1]
    assert hello.gpus[0].compute_units > 0 and hello.gpus[0].name
    assert [(s.slot, s.capabilities, s.gpu_index) for s in hello.slots] == [
        (0, ("cpu",), None),
        (1, ("gpu",), 0),
        (2, ("gpu",), 1),
    ]
    beats = await agent.heartbeats(2)
    assert [b.seq for b in beats[:2]] == [0, 1]
    for beat in beats[:2]:
        assert beat.gpus == (fake_gpu_sample(0, beat.seq), fake_gpu_sample(1, beat.seq))
        assert beat.gpu_status == ""
    # The GPU slot runs tasks like any other (pinned via CUDA_VISIBLE_DEVICES).
    agent.send(Run(tasks=(binary_task(1, "/bin/sh", "-c", "echo $CUDA_VISIBLE_DEVICES", slot=2),)))
    assert (await agent.outcome(1)).stdout == b"1\n"


async def test_heartbeats_carry_host_telemetry(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", heartbeat_interval=0.05)
    beats = await agent.heartbeats(3)
    assert [b.seq for b in beats[:3]] == [0, 1, 2]
    beat = beats[-1]
    assert beat.memory_total > 0 and 0 < beat.memory_used <= beat.memory_total
    assert 0.0 <= beat.cpu_percent <= 100.0 * (os.cpu_count() or 1)
    if not beat.gpus:
        assert beat.gpu_status  # says why there is no GPU data


async def test_coordinator_error_in_handshake_ends_the_agent(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", handshake=False)
    await agent.message(Hello)
    agent.send(Error(message="cluster file names a different host"))
    assert await agent.exit_code() == 1
    assert b"cluster file names a different host" in agent.stderr


# -- running tasks ------------------------------------------------------------------------


@BOTH_SPAWN_MODES
async def test_kernels_run(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(
        Run(
            tasks=(
                kernel_task(1, "noop", 42),
                kernel_task(2, "spin", 0.01, slot=1),
                kernel_task(3, "noop", (1, [2.5, "x"], {"k": b"v"})),
            )
        )
    )
    one, two, three = await agent.outcomes_for([1, 2, 3])
    assert (one.status, one.value, one.slot, one.attempt) == (Outcome.OK, 42, 0, 1)
    assert two.status == Outcome.OK and two.value >= 0.01 and two.run_s >= 0.01
    assert three.value == (1, [2.5, "x"], {"k": b"v"})


@BOTH_SPAWN_MODES
async def test_binaries_run_with_output_exit_code_env_and_cwd(start_agent: StartAgent, tmp_path: Path) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(
        Run(
            tasks=(
                binary_task(1, "/bin/echo", "hello", "world"),
                binary_task(2, "/bin/sh", "-c", "exit 3"),
                binary_task(3, "/bin/sh", "-c", "echo oops >&2", slot=1),
                binary_task(4, "/bin/sh", "-c", "echo $FOO; pwd", env={"FOO": "bar"}, cwd=str(tmp_path)),
                binary_task(5, "/no/such/binary", slot=1),
                binary_task(6, "/bin/sh", "-c", "kill -9 $$"),
            )
        )
    )
    echo, exit3, err, envcwd, missing, killed = await agent.outcomes_for(range(1, 7))
    assert (echo.status, echo.stdout, echo.exit_code) == (Outcome.OK, b"hello world\n", 0)
    assert (exit3.status, exit3.exit_code) == (Outcome.ERROR, 3)
    assert "exited with code 3" in (exit3.error or "")
    assert (err.status, err.stderr, err.stdout) == (Outcome.OK, b"oops\n", b"")
    assert envcwd.stdout == f"bar\n{tmp_path}\n".encode()
    assert missing.status == Outcome.ERROR and "/no/such/binary" in (missing.error or "")
    assert killed.status == Outcome.ERROR and "SIGKILL" in (killed.error or "")


async def test_binary_output_is_capped(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(binary_task(1, "/bin/sh", "-c", "head -c 3000000 /dev/zero"),)))
    outcome = await agent.outcome(1)
    assert outcome.status == Outcome.OK
    assert outcome.stdout.startswith(b"\0" * (1 << 20))
    assert b"truncated" in outcome.stdout[1 << 20 :]
    assert len(outcome.stdout) < (1 << 20) + 200


async def test_unknown_kernel_is_an_error_and_the_agent_keeps_working(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "no_such_kernel"), kernel_task(2, "noop", 7))))
    unknown, after = await agent.outcomes_for([1, 2])
    assert unknown.status == Outcome.ERROR
    assert "no_such_kernel" in (unknown.error or "")
    assert (after.status, after.value) == (Outcome.OK, 7)


async def test_kernel_exception_is_an_error_with_traceback(start_agent: StartAgent, kernel_env: dict[str, str]) -> None:
    agent = await start_agent(
        "--slots", "1", "--gpus", "none", "--kernel-module", "batuta_test_kernels", env=kernel_env
    )
    agent.send(
        Run(
            tasks=(
                kernel_task(1, "test_boom", "bad input", backend="scalar"),
                kernel_task(2, "spin", "not a number"),
                kernel_task(3, "noop", 1),
            )
        )
    )
    boom, bad_input, after = await agent.outcomes_for([1, 2, 3])
    assert (boom.status, boom.error) == (Outcome.ERROR, "ValueError: bad input")
    assert b"Traceback" in boom.stderr and b"raise ValueError" in boom.stderr
    assert bad_input.status == Outcome.ERROR and "KernelInputError" in (bad_input.error or "")
    assert after.status == Outcome.OK


async def test_unsendable_result_is_an_error_not_a_crash(start_agent: StartAgent, kernel_env: dict[str, str]) -> None:
    agent = await start_agent(
        "--slots", "1", "--gpus", "none", "--kernel-module", "batuta_test_kernels", env=kernel_env
    )
    agent.send(
        Run(tasks=(kernel_task(1, "test_unsendable", backend="scalar"), kernel_task(2, "test_pid", backend="scalar")))
    )
    bad, pid = await agent.outcomes_for([1, 2])
    assert bad.status == Outcome.ERROR
    assert (bad.error or "").startswith(
        "the task's result cannot be sent to the coordinator: "
        "the value it returned: cannot send a value of type object; "
    )  # in the kernel's words, not the codec's exception and message field
    assert pid.status == Outcome.OK
    assert agent.of_type(SlotChanged) == []  # the slot did not restart


@BOTH_SPAWN_MODES
async def test_kernel_printing_to_stdout_does_not_corrupt_the_stream(
    start_agent: StartAgent, kernel_env: dict[str, str]
) -> None:
    agent = await start_agent(
        "--slots", "1", "--gpus", "none", "--kernel-module", "batuta_test_kernels", env=kernel_env
    )
    agent.send(Run(tasks=(kernel_task(1, "test_print", "hello from a kernel", backend="scalar"),)))
    agent.send(Run(tasks=(kernel_task(2, "noop", 5),)))
    printed, after = await agent.outcomes_for([1, 2])
    assert (printed.status, printed.value) == (Outcome.OK, "hello from a kernel")
    assert after.value == 5
    assert agent.protocol_error is None
    await agent.wait_for(lambda: b"raw write to fd 1" in agent.stderr, what="print on stderr")
    assert b"hello from a kernel" in agent.stderr


async def test_run_for_a_slot_the_agent_lacks_is_an_error(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "noop", 1, slot=5),)))
    outcome = await agent.outcome(1)
    assert outcome.status == Outcome.ERROR and "no slot 5" in (outcome.error or "")


async def test_objects_put_on_the_agent_replace_their_refs_and_a_missing_one_is_an_error(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Put(object_id=4, value=np.arange(4000.0)))
    agent.send(Run(tasks=(kernel_task(1, "sum", ObjectRef(4), backend="cpu"),)))
    agent.send(Run(tasks=(kernel_task(2, "sum", {"x": [ObjectRef(4)]}, backend="cpu"),)))
    agent.send(Run(tasks=(kernel_task(3, "sum", ObjectRef(5), backend="cpu"),)))
    present, nested, missing = await agent.outcomes_for([1, 2, 3])
    assert present.status == Outcome.OK and present.value == np.arange(4000.0).sum()
    assert nested.status == Outcome.ERROR and "dict" in (nested.error or "")  # the value arrived, in place
    assert missing.status == Outcome.ERROR and "object(s) 5 are not on this host" in (missing.error or "")
    agent.send(Drop(object_ids=(4,)))  # as the coordinator does: once no task names it
    agent.send(Run(tasks=(kernel_task(4, "sum", ObjectRef(4), backend="cpu"),)))
    dropped = await agent.outcome(4)
    assert dropped.status == Outcome.ERROR and "object(s) 4 are not on this host" in (dropped.error or "")
    assert agent.protocol_error is None


async def test_started_is_reported_and_omitted_when_done_comes_in_the_same_write(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 0.3), kernel_task(2, "noop", 2))))
    await agent.started_task(1)
    assert 1 not in agent.outcomes  # Started came before the result
    await agent.outcomes_for([1, 2])
    assert agent.started.count(1) == 1 and agent.started.count(2) <= 1


async def test_a_result_of_a_slot_busy_with_its_next_task_is_reported_while_that_task_runs(
    start_agent: StartAgent,
) -> None:
    """On a host with a slot on every core (one core here: the agent's affinity), the reports of
    a busy slot may wait a little to go out together (`outbox.Flusher`), but they go by
    themselves: no other message has to come along (heartbeats are a minute apart here)."""
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # the agent inherits it
    try:
        agent = await start_agent("--slots", "1", "--gpus", "none")
    finally:
        os.sched_setaffinity(0, cores)
    agent.send(Run(tasks=(kernel_task(1, "spin", 0.01),)))
    assert (await agent.outcome(1)).status == Outcome.OK  # a task under 20 ms: the next one is fed behind it
    agent.send(Run(tasks=(kernel_task(2, "spin", 0.01), kernel_task(3, "spin", 30.0))))
    assert (await agent.outcome(2)).status == Outcome.OK  # its slot busy with the next for long: it may wait
    await agent.started_task(3)
    assert 3 not in agent.outcomes
    agent.send(Cancel(task_ids=(3,)))
    assert (await agent.outcome(3)).status == Outcome.CANCELLED


# -- timeouts, cancel, steal-back ---------------------------------------------------------


@BOTH_SPAWN_MODES
async def test_timeout_kills_a_binary_and_its_child(start_agent: StartAgent, tmp_path: Path) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    fifo = _fifo(tmp_path)
    script = f"sleep 30 & echo $! > {fifo}; wait"
    agent.send(
        Run(
            tasks=(
                binary_task(1, "/bin/sh", "-c", script, timeout=0.5),
                kernel_task(2, "noop", "after"),
            )
        )
    )
    child_pid = int(await _read_fifo_line(fifo))
    shell = [p for p in agent.descendants() if p.name() == "sh"]
    timed_out = await agent.outcome(1)
    assert timed_out.status == Outcome.TIMEOUT
    assert "0.5 s" in (timed_out.error or "")
    assert timed_out.run_s >= 0.5
    assert await still_alive([child_pid, *(p.pid for p in shell)]) == []
    after = await agent.outcome(2)
    assert (after.status, after.value) == (Outcome.OK, "after")
    states = [(s.slot, s.state) for s in agent.of_type(SlotChanged)]
    assert states[:2] == [(0, SLOT_RESTARTING), (0, SLOT_UP)]


async def test_timeout_kills_a_long_kernel(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 30.0, timeout=0.3), kernel_task(2, "noop", 2))))
    t0 = time.monotonic()
    timed_out = await agent.outcome(1)
    assert timed_out.status == Outcome.TIMEOUT
    assert time.monotonic() - t0 < 10
    assert (await agent.outcome(2)).value == 2


@BOTH_SPAWN_MODES
async def test_cancel_queued_running_and_unknown(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 30.0), kernel_task(2, "noop", 2), kernel_task(3, "noop", 3))))
    await agent.started_task(1)
    agent.send(Cancel(task_ids=(2, 999)))
    queued = await agent.outcome(2)
    assert queued.status == Outcome.CANCELLED
    assert 1 not in agent.outcomes
    spinner_pid = agent.slot_process(0).pid
    agent.send(Cancel(task_ids=(1,)))
    running = await agent.outcome(1)
    assert running.status == Outcome.CANCELLED
    assert await still_alive([spinner_pid]) == []
    assert (await agent.outcome(3)).value == 3
    assert 999 not in agent.outcomes
    assert all(count == 1 for count in agent.outcome_count.values())


async def test_cancel_of_fed_tasks_behind_the_running_one(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    # Teach the slot that tasks are tiny, so it feeds deep.
    agent.send(Run(tasks=tuple(kernel_task(i, "noop", i) for i in range(1, 51))))
    await agent.outcomes_for(range(1, 51))
    agent.send(Run(tasks=(kernel_task(100, "spin", 0.5), *(kernel_task(i, "noop", i) for i in range(101, 111)))))
    await agent.started_task(100)
    agent.send(Cancel(task_ids=tuple(range(101, 111))))
    cancelled = await agent.outcomes_for(range(101, 111))
    assert {o.status for o in cancelled} == {Outcome.CANCELLED}
    assert (await agent.outcome(100)).status == Outcome.OK  # the running task was left alone


async def test_steal_back_returns_unstarted_and_refuses_the_running(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 30.0), *(kernel_task(i, "noop", i) for i in (2, 3, 4)))))
    await agent.started_task(1)
    agent.send(StealBack(slot=0, task_ids=(1, 3, 4, 77)))
    reply = await agent.message(StealBackReply)
    assert reply.slot == 0
    assert reply.returned == (3, 4)
    assert set(reply.refused) == {1, 77}
    agent.send(Cancel(task_ids=(1,)))
    assert (await agent.outcome(1)).status == Outcome.CANCELLED
    assert (await agent.outcome(2)).status == Outcome.OK
    # Returned tasks are never answered.
    agent.send(Run(tasks=(kernel_task(5, "noop", 5),)))
    await agent.outcome(5)
    assert 3 not in agent.outcomes and 4 not in agent.outcomes


async def test_tail_tasks_stay_stealable_behind_a_running_task(start_agent: StartAgent) -> None:
    """Tail tasks (`core/tailfeed.py`) wait at the agent, not in the slot process, while a task
    runs: a steal-back takes them even after short tasks raised the feed depth, and the one
    left runs once the slot is idle. Each task is answered once; the returned one never."""
    agent = await start_agent("--slots", "1", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "noop", 1),)))
    assert (await agent.outcome(1)).status == Outcome.OK  # a microsecond task: the depth goes up
    agent.send(Run(tasks=(kernel_task(2, "spin", 30.0), *(kernel_task(i, "noop", i, tail=True) for i in (3, 4)))))
    await agent.started_task(2)
    agent.send(StealBack(slot=0, task_ids=(3,)))
    reply = await agent.message(StealBackReply)
    assert (reply.returned, reply.refused) == ((3,), ())
    agent.send(Cancel(task_ids=(2,)))
    assert (await agent.outcome(2)).status == Outcome.CANCELLED
    assert (await agent.outcome(4)).status == Outcome.OK
    agent.send(Run(tasks=(kernel_task(5, "noop", 5),)))
    await agent.outcome(5)
    assert 3 not in agent.outcomes


# -- failures -----------------------------------------------------------------------------


@BOTH_SPAWN_MODES
async def test_killed_slot_crashes_its_task_and_comes_back(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(
        Run(
            tasks=(
                kernel_task(1, "spin", 30.0),
                kernel_task(2, "noop", 2),
                kernel_task(3, "noop", 3),
                kernel_task(4, "spin", 0.05, slot=1),
                kernel_task(5, "noop", 5, slot=1),
            )
        )
    )
    await agent.started_task(1)
    victim = agent.slot_process(0)
    victim.send_signal(signal.SIGKILL)
    crashed = await agent.outcome(1)
    assert crashed.status == Outcome.CRASHED
    assert "signal 9" in (crashed.error or "") and "slot 0" in (crashed.error or "")
    # a SIGKILL no one here sent: most often the OOM killer, which the agent's own death named and a slot's did not
    assert "killed by signal 9 (SIGKILL): out of memory on the host (the kernel's OOM killer)" in (crashed.error or "")
    rest = await agent.outcomes_for([2, 3, 4, 5])
    assert [o.status for o in rest] == [Outcome.OK] * 4
    await agent.message(SlotChanged, lambda s: s.state == SLOT_UP)
    states = [(s.slot, s.state) for s in agent.of_type(SlotChanged)]
    assert states == [(0, SLOT_RESTARTING), (0, SLOT_UP)]
    assert "signal 9" in agent.of_type(SlotChanged)[0].reason
    assert agent.slot_process(0).pid != victim.pid
    assert all(count == 1 for count in agent.outcome_count.values())


async def test_garbage_from_the_coordinator_gets_an_error_and_a_nonzero_exit(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none")
    slots = agent.descendants()
    agent.send_raw(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    assert await agent.exit_code() == 1
    error = await agent.message(Error)
    assert "protocol" in error.message
    assert await still_alive([p.pid for p in slots]) == []


async def test_garbage_before_welcome(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", handshake=False)
    agent.send_raw(b"this is not a frame at all")
    assert await agent.exit_code() != 0


# -- ending -------------------------------------------------------------------------------


@BOTH_SPAWN_MODES
async def test_stdin_eof_kills_everything_and_exits(start_agent: StartAgent, tmp_path: Path) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    fifo = _fifo(tmp_path)
    agent.send(
        Run(
            tasks=(
                binary_task(1, "/bin/sh", "-c", f"sleep 30 & echo $! > {fifo}; wait"),
                kernel_task(2, "spin", 30.0, slot=1),
            )
        )
    )
    child = int(await _read_fifo_line(fifo))
    await agent.started_task(2)
    everything = [p.pid for p in agent.descendants()] + [child]
    assert len(everything) >= 4  # two slots, the shell, its sleep
    agent.close_stdin()
    assert await agent.exit_code() == 0
    assert await still_alive(everything) == []


async def test_a_coordinator_gone_mid_frame_ends_the_agent_as_its_end_of_stream_does(start_agent: StartAgent) -> None:
    """A Ctrl-C while a value was on its way: the agent said "protocol error from the
    coordinator: stream closed ..." and exited 1, as if the coordinator had sent garbage."""
    agent = await start_agent("--slots", "1", "--gpus", "none")
    frame = encode_message(Run(tasks=(kernel_task(1, "noop", 1),)))
    agent.send_raw(frame[: len(frame) // 2])
    agent.close_stdin()
    assert await agent.exit_code() == 0
    assert b"protocol error" not in agent.stderr


async def test_an_agent_that_hears_nothing_from_its_coordinator_exits_with_its_slots(
    start_agent: StartAgent,
) -> None:
    """A host cut off by a partition gets no end of stream: its agent and slots ran on after
    the run (until the link came back). Keepalives keep it; their absence ends it."""
    agent = await start_agent("--slots", "2", "--gpus", "none", handshake=False)
    await agent.message(Hello)
    agent.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=0.05, silence_limit=1.0))
    for beats in range(5, 45, 5):  # two seconds of heartbeats, past the limit, and a keepalive each 0.25 s
        await agent.heartbeats(beats)
        agent.send(Keepalive())
    assert agent.proc.returncode is None
    slots = [p.pid for p in agent.descendants()]
    assert len(slots) == 2
    assert await agent.exit_code() == 1  # then silence
    assert b"nothing from the coordinator for " in agent.stderr and b"it is gone or cut off; exiting" in agent.stderr
    assert await still_alive(slots) == []


async def test_shutdown_says_bye_and_exits_zero(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 30.0),)))
    await agent.started_task(1)
    slots = [p.pid for p in agent.descendants()]
    agent.send(Shutdown(reason="done for today"))
    bye = await agent.message(Bye)
    assert bye.reason == "done for today"
    assert await agent.exit_code() == 0
    assert await still_alive(slots) == []


async def test_sigterm_stops_slots(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(1, "spin", 30.0),)))
    await agent.started_task(1)
    slots = [p.pid for p in agent.descendants()]
    agent.proc.send_signal(signal.SIGTERM)
    assert await agent.exit_code() == 128 + signal.SIGTERM
    assert await still_alive(slots) == []
    assert (await agent.message(Bye)).reason


@BOTH_SPAWN_MODES
async def test_sigkilled_agent_leaves_no_slots(start_agent: StartAgent, tmp_path: Path) -> None:
    agent = await start_agent("--slots", "2", "--gpus", "none")
    fifo = _fifo(tmp_path)
    agent.send(Run(tasks=(binary_task(1, "/bin/sh", "-c", f"sleep 30 & echo $! > {fifo}; wait"),)))
    child = int(await _read_fifo_line(fifo))
    everything = [p.pid for p in agent.descendants()] + [child]
    agent.proc.send_signal(signal.SIGKILL)
    await agent.exit_code()
    assert await still_alive(everything) == []


# -- command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--slots", "two"], "--slots"),
        (["--slots", "-1"], "--slots"),
        (["--gpus", "fast"], "--gpus"),
        (["--gpus", "7"], "no GPU 7"),
        (["--bogus"], "unrecognized"),
        (["--kernel-module", "not a module"], "--kernel-module"),
        ([], "--stdio"),
    ],
)
async def test_bad_arguments_exit_2_with_one_line(args: list[str], needle: str) -> None:
    stdio = [] if not args else ["--stdio"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batuta.agent",
        *stdio,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BATUTA_FAKE_GPUS": "0"},
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert needle in lines[0]
    assert stdout == b""


# -- throughput ---------------------------------------------------------------------------


async def test_throughput_of_trivial_tasks(start_agent: StartAgent) -> None:
    """Not a timing assertion: prints tasks/s for 5000 noops through 2 slots."""
    agent = await start_agent("--slots", "2", "--gpus", "none")
    agent.send(Run(tasks=(kernel_task(0, "noop", 0), kernel_task(1, "noop", 1, slot=1))))
    await agent.outcomes_for([0, 1])
    count = 5000
    ids = range(10, 10 + count)
    t0 = time.perf_counter()
    for start in range(0, count, 250):
        chunk = ids[start : start + 250]
        agent.send(Run(tasks=tuple(kernel_task(i, "noop", i, slot=i % 2) for i in chunk)))
    outcomes = await agent.outcomes_for(ids, timeout=120)
    elapsed = time.perf_counter() - t0
    assert all(o.status == Outcome.OK and o.value == o.task_id for o in outcomes)
    print(f"\nagent throughput: {count} noop tasks through 2 slots in {elapsed:.3f} s = {count / elapsed:,.0f} tasks/s")
