"""The runtime end to end on real local agents: real processes, real pipes, real kills."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import batuta
from batuta import Backend, Pool, Task, TaskFailedError, TaskResult, TaskStatus
from batuta.core.task import gpu_capability
from batuta.errors import UsageError
from batuta.protocol import messages as m
from batuta.runtime import events as pe
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]
TEST_KERNELS = "tests.support.misbehaving_kernels"


def make_pool(slots: int = 2, **config: object) -> Pool:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(slots, gpus="none", kernel_modules=[TEST_KERNELS], env=env)
    return Pool([host], PoolConfig(**config))  # type: ignore[arg-type]


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def assert_all_gone(pids: set[int], timeout: float = 10.0) -> None:
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=timeout)
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with make_pool() as p:
        yield p


def living(procs: Iterable[psutil.Process], test: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """The processes among `procs` that pass `test`, skipping any that end while it is asked:
    short-lived children (a compiler, a probe) come and go while a test looks."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if test(proc):
                found.append(proc)
    return found


def children(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.children()
    return []


def agent_pids() -> list[psutil.Process]:
    return living(psutil.Process().children(), lambda p: "batuta.agent" in " ".join(p.cmdline()))


def slot_pids() -> list[psutil.Process]:
    return [c for a in agent_pids() for c in living(children(a), lambda c: "python" in c.name())]


async def test_kernel_tasks_return_correct_values(pool: Pool) -> None:
    a = np.arange(5000, dtype=np.float64)
    b = np.ones(5000, dtype=np.float64)
    result = await pool.run(Task.kernel("vadd", a, b, backend=Backend.CPU))
    assert result.is_success(), result.error
    np.testing.assert_array_equal(result.value, a + b)
    assert result.host == "local" and result.slot is not None and result.attempts == 1
    assert result.backend is Backend.CPU and result.duration >= 0 and result.queue_wait >= 0


async def test_many_tasks_resolve_exactly_once_with_events(pool: Pool) -> None:
    seen: dict[int, list[str]] = {}

    def observe(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskQueued):
            seen.setdefault(event.task_id, []).append("queued")
        elif isinstance(event, pe.TaskFinished):
            seen.setdefault(event.result.task_id, []).append("finished")

    def broken_observer(event: pe.PoolEvent) -> None:
        raise RuntimeError("observer bug")

    pool.subscribe(observe)
    pool.subscribe(broken_observer)
    futures = [await pool.submit(Task.kernel("noop", i)) for i in range(500)]
    results = [await f for f in futures]
    assert [r.value for r in results] == list(range(500))
    assert all(r.status is TaskStatus.SUCCEEDED for r in results)
    assert len({r.task_id for r in results}) == 500
    assert all(seen[f.task_id] == ["queued", "finished"] for f in futures)
    assert pool.stats().succeeded == 500 and pool.stats().dropped_results == 0
    assert pool.events.errors >= 500  # the broken observer was isolated, every time


async def test_kernel_error_and_unknown_kernel_fail_without_harming_others(pool: Pool) -> None:
    bad = await pool.submit(Task.kernel("test_raise", "boom"))
    unknown = await pool.submit(Task.kernel("no_such_kernel", 1))
    good = await pool.submit(Task.kernel("noop", 7))
    bad_result, unknown_result, good_result = await bad, await unknown, await good
    assert bad_result.status is TaskStatus.FAILED and "boom" in (bad_result.error or "")
    assert bad_result.attempts == 1  # a kernel error is not retried
    assert unknown_result.status is TaskStatus.FAILED and "no_such_kernel" in (unknown_result.error or "")
    assert good_result.value == 7
    with pytest.raises(TaskFailedError, match="boom"):
        bad_result.unwrap()


async def test_binary_tasks_capture_output_and_exit_codes(pool: Pool, tmp_path: Path) -> None:
    echo = await pool.run(Task.builder().binary("/bin/echo").arg("hello").arg("world").build())
    assert echo.is_success() and echo.stdout_str() == "hello world\n" and echo.exit_code == 0
    failing = await pool.run(Task.binary("/bin/sh", "-c", "echo oops >&2; exit 3"))
    assert failing.status is TaskStatus.FAILED and failing.exit_code == 3 and "oops" in failing.stderr_str()
    env_cwd = await pool.run(
        Task.binary("/bin/sh", "-c", "echo $BATUTA_X; pwd", env={"BATUTA_X": "42"}, cwd=str(tmp_path))
    )
    assert env_cwd.stdout_str().split() == ["42", str(tmp_path)]


async def test_timeout_kills_the_work_and_the_pool_goes_on(pool: Pool) -> None:
    slow = await pool.submit(Task.binary("/bin/sleep", "30", timeout=0.5))
    spin = await pool.submit(Task.kernel("spin", 30.0, timeout=0.5))
    slow_result, spin_result = await slow, await spin
    assert slow_result.status is TaskStatus.TIMED_OUT
    assert spin_result.status is TaskStatus.TIMED_OUT
    assert (await pool.run(Task.kernel("noop", 1))).value == 1


async def test_cancel_a_running_task(pool: Pool) -> None:
    before = pool.stats()
    fut = await pool.submit(Task.kernel("spin", 30.0))
    started = asyncio.Event()
    pool.subscribe(lambda e: started.set() if isinstance(e, pe.TaskStarted) and e.task_id == fut.task_id else None)
    await asyncio.wait_for(started.wait(), 20)
    assert fut.cancel()
    result = await asyncio.wait_for(fut, 20)
    assert result.status is TaskStatus.CANCELLED
    assert (await pool.run(Task.kernel("noop", 2))).value == 2
    after = pool.stats()  # a cancelled task is not a failed one
    assert (after.cancelled, after.failed) == (before.cancelled + 1, before.failed)


async def test_asyncio_wait_takes_task_futures_as_it_takes_asyncio_futures(pool: Pool) -> None:
    """`asyncio.wait(futures)` raised AttributeError: no remove_done_callback. (typeshed types
    wait's futures as asyncio.Future: hence the ignores.)"""
    quick = [await pool.submit(Task.kernel("noop", i)) for i in range(3)]
    slow = await pool.submit(Task.kernel("spin", 30.0))
    done, pending = await asyncio.wait([*quick, slow], timeout=60, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    assert done and done <= set(quick) and slow in pending
    done, pending = await asyncio.wait(quick, timeout=60)  # type: ignore[type-var]
    assert done == set(quick) and not pending and not any(f.cancelled() or f.exception() for f in quick)
    slow.cancel()
    done, pending = await asyncio.wait([slow], timeout=60, return_when=asyncio.FIRST_EXCEPTION)  # type: ignore[type-var]
    assert done == {slow} and slow.cancelled() and slow.exception() is None
    assert not slow._callbacks  # what wait registered, it took away


async def test_a_cancelled_pool_run_cancels_its_task(pool: Pool) -> None:
    """`asyncio.wait_for(pool.run(task), 0.3)` gave up the wait and left the task running, with
    no handle to stop it: the slot stayed busy for its whole run."""
    before = pool.stats()
    started = asyncio.Event()
    pool.subscribe(lambda e: started.set() if isinstance(e, pe.TaskStarted) else None)
    running = asyncio.create_task(pool.run(Task.kernel("spin", 30.0)))
    await asyncio.wait_for(started.wait(), 20)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (await asyncio.wait_for(pool.run(Task.kernel("noop", 3)), 20)).value == 3
    after = pool.stats()
    assert after.cancelled == before.cancelled + 1 and after.in_flight == 0


async def test_killed_worker_slot_is_retried_elsewhere(pool: Pool, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    result = await asyncio.wait_for(pool.run(Task.kernel("test_crash_once", str(marker))), 60)
    assert result.is_success() and result.value == "survived"
    assert result.attempts == 2 and marker.exists()
    assert pool.stats().retries == 1


async def test_poison_task_fails_after_max_attempts_and_cluster_keeps_running(pool: Pool) -> None:
    poison = await pool.submit(Task.kernel("test_crash", max_attempts=2))
    others = [await pool.submit(Task.kernel("noop", i)) for i in range(20)]
    result = await asyncio.wait_for(poison, 60)
    assert result.status is TaskStatus.LOST and result.attempts == 2
    assert "2 attempts" in (result.error or "")
    assert [(await f).value for f in others] == list(range(20))


async def test_kill_9_of_the_agent_requeues_and_relaunches() -> None:
    async with make_pool(relaunch_backoff=0.1) as pool:
        futures = [await pool.submit(Task.kernel("spin", 0.05)) for _ in range(16)]
        first = await futures[0]
        assert first.is_success()
        [agent] = agent_pids()
        agent.kill()
        results = await asyncio.wait_for(asyncio.gather(*(f.asyncio_future() for f in futures)), 60)
        assert all(r.is_success() for r in results), [r.error for r in results if not r.is_success()]
        assert len({r.task_id for r in results}) == 16
        [new_agent] = agent_pids()
        assert new_agent.pid != agent.pid


async def test_a_task_not_safe_to_repeat_fails_with_its_agent_and_never_runs_again(tmp_path: Path) -> None:
    """A retry=False binary that appends a line to a file: kill -9 of the agent while it runs
    makes it LOST, and the relaunched agent never runs it a second time."""
    ran = tmp_path / "ran"
    script = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).open('a').write('ran\\n'); time.sleep(60)"
    async with make_pool(slots=1, relaunch_backoff=0.1) as pool:
        future = await pool.submit(Task.binary(sys.executable, "-c", script, str(ran), retry=False))
        for _ in range(600):  # bounded: at most 30 s for the binary to write its line
            if ran.exists() and ran.read_text():
                break
            await asyncio.sleep(0.05)
        assert ran.read_text() == "ran\n", "the binary never started"
        [agent] = agent_pids()
        agent.kill()
        result = await asyncio.wait_for(future, 60)
        assert result.status is TaskStatus.LOST, result.describe_failure()
        assert result.attempts == 1 and result.host == "local"
        after = await asyncio.wait_for(pool.run(Task.kernel("noop", 7)), 60)  # the relaunched agent works
        assert after.value == 7 and after.attempts == 1
        assert ran.read_text() == "ran\n"
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(ran) in (p.info["cmdline"] or [])]
    for process in leftovers:  # the binary outlives a SIGKILLed agent: stop it by PID
        process.kill()
    psutil.wait_procs(leftovers, timeout=10)


async def test_stopped_agent_is_declared_lost_and_replaced() -> None:
    async with make_pool(heartbeat_interval=0.2, suspect_after=0.6, lost_after=1.5, relaunch_backoff=0.1) as pool:
        states: list[str] = []
        pool.subscribe(lambda e: states.append(e.state) if isinstance(e, pe.HostStateChanged) else None)
        [agent] = agent_pids()
        warm = await pool.run(Task.kernel("noop", 0))
        assert warm.is_success()
        agent.send_signal(signal.SIGSTOP)
        try:
            fut = await pool.submit(Task.kernel("noop", 5))
            result = await asyncio.wait_for(fut, 60)
        finally:
            if psutil.pid_exists(agent.pid):
                agent.send_signal(signal.SIGCONT)
        assert result.value == 5
        assert "suspected" in states and "up" in states
        assert_all_gone({agent.pid})


async def test_backpressure_makes_submit_wait() -> None:
    pool = Pool.builder().cpu_workers(1).gpu_workers("none").max_queued(4).build()
    async with pool:
        futures = [await pool.submit(Task.kernel("spin", 0.002)) for _ in range(40)]
        assert pool.stats().queued <= 4
        results = await asyncio.gather(*(f.asyncio_future() for f in futures))
        assert all(r.is_success() for r in results)
        pool.pause()
        held = [pool.submit_nowait(Task.kernel("noop", i)) for i in range(4)]
        with pytest.raises(batuta.errors.UsageError, match=r"max_queued=4 tasks; await pool\.submit"):
            pool.submit_nowait(Task.kernel("noop", 5))  # without waiting: refused, not queued
        pool.resume()
        assert [(await f).value for f in held] == [0, 1, 2, 3]


async def test_pause_starts_nothing_more_even_what_the_agent_holds() -> None:
    """`p` in the dashboard: "running tasks finish, queued ones wait", also the ones already in
    the slot's window at the agent (they went on starting, one after another)."""
    started: list[int] = []
    async with Pool.builder().cpu_workers(1).gpu_workers("none").window(min_window=4).build() as pool:
        pool.subscribe(lambda e: started.append(e.task_id) if isinstance(e, pe.TaskStarted) else None)
        futures = [await pool.submit(Task.kernel("spin", 1.0)) for _ in range(6)]
        async with asyncio.timeout(60):
            while not started:
                await asyncio.sleep(0.01)
            pool.pause()
            while pool.stats().in_flight:  # the running one finishes; the rest came back
                await asyncio.sleep(0.01)
        assert len(started) <= 2  # the one running at the pause (and one just starting as it came)
        assert pool.stats().queued == 6 - len(started)
        pool.resume()
        results = [await f for f in futures]
    assert all(r.is_success() for r in results) and len(set(started)) == 6


async def test_a_burst_into_an_idle_pool_sends_its_first_tasks_while_the_rest_is_submitted(pool: Pool) -> None:
    """The hosts start on a burst while it is submitted (the 1st, 2nd, 4th... task goes out at
    once), not when the submitting loop first waits for something: placed and written before
    the next submission."""
    (session,) = pool._hosts.sessions.values()
    conn = session._conn
    assert conn is not None
    written: list[tuple[int, ...]] = []  # the task ids of each Run written to the agent
    send_many_parts = conn.send_many_parts

    def recording(messages: Iterable[m.Message]) -> list[Any]:
        messages = tuple(messages)
        written.extend(tuple(t.task_id for t in msg.tasks) for msg in messages if isinstance(msg, m.Run))
        return send_many_parts(messages)

    conn.send_many_parts = recording  # type: ignore[method-assign,assignment]
    first = await pool.submit(Task.kernel("noop", 0))
    assert written == [(first.task_id,)]
    second = await pool.submit(Task.kernel("noop", 1))
    assert written == [(first.task_id,), (second.task_id,)]
    futures = [first, second] + [await pool.submit(Task.kernel("noop", i)) for i in range(2, 300)]
    assert [(await f).value for f in futures] == list(range(300))


async def test_map_and_map_chunked(pool: Pool) -> None:
    assert await pool.map("noop", range(10)) == list(range(10))
    assert await pool.map("noop", []) == []  # nothing to wait for: returns at once
    x = np.linspace(0, 1, 25_000, dtype=np.float64)
    sums = await pool.map_chunked("sum", x, chunk_size=10_000)
    assert len(sums) == 3
    assert sum(sums) == pytest.approx(float(x.sum()), rel=1e-9)


async def test_map_fails_fast_with_the_failed_result(pool: Pool) -> None:
    with pytest.raises(TaskFailedError) as info:
        await pool.map("test_raise", ["first failure"])
    assert info.value.result is not None and "first failure" in str(info.value)


async def test_a_file_name_that_is_not_utf8_is_refused_at_submit_and_no_host_is_lost(pool: Pool) -> None:
    """Such a str (os.fsdecode, os.listdir) was taken, then failed its whole Run: the host
    session was lost five times over, and tasks queued beside it were lost with it."""
    name = os.fsdecode(b"data_\xff.npy")
    running = [await pool.submit(Task.kernel("noop", i)) for i in range(4)]
    for args in ((name,), ([1, {"file": name}],), ({name: 1},)):
        with pytest.raises(UsageError, match=r"str is not valid UTF-8 \(surrogates not allowed at index \d+: a file"):
            await pool.submit(Task.kernel("noop", *args))
    assert [(await future).value for future in running] == [0, 1, 2, 3]
    assert pool.stats().requeues == 0
    assert (await pool.run(Task.kernel("noop", os.fsencode(name)))).value == b"data_\xff.npy"  # the fix it names


async def test_a_value_that_holds_itself_is_one_line_not_a_recursion_error(pool: Pool) -> None:
    """A list holding itself was a RecursionError of some 3,000 lines, from where the
    arguments are taken at submit (snapshot.py)."""
    looped: list[Any] = []
    looped.append(looped)
    itself: dict[str, Any] = {}
    itself["me"] = itself
    with pytest.raises(UsageError, match=r"\]: nested deeper than 32 levels \(or a list or dict that holds itself\)$"):
        await pool.submit(Task.kernel("noop", looped))
    with pytest.raises(UsageError, match=r"'\]: nested deeper than 32 levels \(or a list or dict that holds itself\)$"):
        pool.put(itself)
    assert (await pool.run(Task.kernel("noop", [[1]]))).value == [[1]]


async def test_a_map_refused_midway_cancels_what_it_submitted(pool: Pool) -> None:
    finished: list[TaskResult] = []
    pool.subscribe(lambda e: finished.append(e.result) if isinstance(e, pe.TaskFinished) else None)
    with pytest.raises(UsageError, match="cannot send a value of type set"):
        await pool.map("spin", [(300.0,)] * 4 + [({1},)])  # the fifth cannot be sent
    assert len(finished) == 4 and all(r.status is TaskStatus.CANCELLED for r in finished)
    assert pool.stats().queued == 0
    # the two spins that had started were stopped, not left running for nobody: the slots are free
    assert await asyncio.wait_for(pool.map("noop", range(3)), 120) == [0, 1, 2]


async def test_modules_in_the_folder_the_pool_starts_in_neither_shadow_nor_leak_into_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "signal.py").write_text("raise ImportError('the job folder shadowed the standard library')\n")
    (tmp_path / "unshipped.py").write_text(
        "from batuta.kernels.registry import kernel\n\n@kernel('unshipped')\ndef unshipped():\n    return 1\n"
    )
    monkeypatch.chdir(tmp_path)  # the agent starts here, as under `batuta run` in a job's folder
    host = local_host(1, gpus="none", env={"PYTHONPATH": str(REPO)})
    async with Pool([host], PoolConfig()) as pool:
        assert (await pool.run(Task.kernel("noop", 7))).value == 7
        result = await pool.run(Task.kernel("unshipped:unshipped"))
    assert result.status is TaskStatus.FAILED and "No module named 'unshipped'" in (result.error or "")


async def test_noisy_kernel_does_not_corrupt_the_stream(pool: Pool) -> None:
    values = await pool.map("test_print", range(50))
    assert values == list(range(50))


async def test_what_a_kernel_prints_is_in_its_result(pool: Pool) -> None:
    """Each task's own Python-level output, not its neighbours' (it still goes to the host's
    log as well); a failing kernel's prints come with its traceback."""
    results = [await pool.run(Task.kernel("test_print", i)) for i in (3, 4)]
    assert [(r.stdout, r.stderr) for r in results] == [
        (b"noise on stdout 3\n", b"noise on stderr 3\n"),
        (b"noise on stdout 4\n", b"noise on stderr 4\n"),
    ]
    assert (await pool.run(Task.kernel("noop", 1))).stdout == b""
    failed = await pool.run(Task.kernel("test_fail_loudly", "bad input"))
    assert failed.status is TaskStatus.FAILED and failed.stdout == b"about to fail on bad input\n"
    assert failed.stderr.startswith(b"Traceback") and b"ValueError: bad input" in failed.stderr


async def test_what_a_kernel_prints_reaches_the_log_marked_with_its_task_at_info(pool: Pool) -> None:
    """At WARNING, a chatty kernel's prints buried the console's warnings (and a 100 KB line
    was one record): they are its result's stdout already."""
    heard: list[logging.LogRecord] = []
    both = asyncio.Event()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "printed: noise on" in record.getMessage():
                heard.append(record)
                if len(heard) == 2:
                    both.set()

    handler = Heard(logging.DEBUG)
    logger = logging.getLogger("batuta.transport")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        result = await pool.run(Task.kernel("test_print", 5))
        await asyncio.wait_for(both.wait(), 30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = sorted(record.getMessage().split(": ", 1)[1] for record in heard)
    assert said == [
        f"task {result.task_id} printed: noise on stderr 5",
        f"task {result.task_id} printed: noise on stdout 5",
    ]
    assert {record.levelno for record in heard} == {logging.INFO}


async def test_what_a_thread_left_running_prints_is_not_the_next_tasks() -> None:
    """A daemon thread a kernel left printing had its output in the next task on that slot
    (its result's stdout, and `task NEXT printed` in the log): it goes to the log only, marked
    with the task that left it."""
    heard: list[str] = []
    both = asyncio.Event()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said = record.getMessage()
            if "left behind by" in said or "my own" in said:
                heard.append(said.split(": ", 1)[1])
                if len(heard) == 2:
                    both.set()

    handler = Heard(logging.DEBUG)
    logger = logging.getLogger("batuta.transport")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with make_pool(slots=1) as pool:  # one slot: the second task runs where the thread is
            first = await pool.run(Task.kernel("test_print_later", 1))
            second = await pool.run(Task.kernel("test_let_it_print", 2))
            await asyncio.wait_for(both.wait(), 30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (first.value, second.value) == (1, True)  # the thread printed while the second task ran
    assert (first.stdout, second.stdout) == (b"", b"my own 2\n")
    assert sorted(heard) == [
        f"task {first.task_id} printed: [after it ended] left behind by 1",
        f"task {second.task_id} printed: my own 2",
    ]


async def test_a_local_agent_that_dies_says_how(pool: Pool) -> None:
    """Its exit, not just "agent closed the stream": a SIGKILL nobody sent is most often the
    kernel's out-of-memory killer, and the log says so."""
    downs: list[str] = []
    pool.subscribe(lambda e: downs.append(e.reason) if isinstance(e, pe.HostDown) else None)
    [agent] = agent_pids()
    agent.send_signal(signal.SIGKILL)
    async with asyncio.timeout(60):
        while not downs:
            await asyncio.sleep(0.01)
    assert downs == [
        "the agent was killed by signal 9 (SIGKILL): out of memory on the host (the kernel's OOM killer), "
        "if no one killed it"
    ]
    assert (await pool.run(Task.kernel("noop", 3))).value == 3  # on the relaunched agent


async def test_close_resolves_pending_tasks_and_leaves_no_processes() -> None:
    before = descendants()
    pool = make_pool()
    await pool.start()
    started = descendants() - before
    assert started, "the pool should have started an agent with slot processes"
    futures = [await pool.submit(Task.kernel("spin", 5.0)) for _ in range(4)]
    await pool.close()
    results = [f.result() for f in futures]
    assert all(r.status is TaskStatus.CANCELLED for r in results)
    assert_all_gone(started)


async def test_gpu_task_without_gpu_is_unschedulable(pool: Pool) -> None:
    a = np.ones(10, dtype=np.float32)
    result = await pool.run(Task.kernel("vadd", a, a, backend=Backend.GPU))
    assert result.status is TaskStatus.UNSCHEDULABLE
    assert "gpu" in (result.error or "")


async def test_submit_after_close_is_a_clear_error() -> None:
    pool = make_pool()
    async with pool:
        pass
    from batuta.errors import PoolClosedError

    with pytest.raises(PoolClosedError, match="closed"):
        await pool.submit(Task.kernel("noop"))
    from batuta.errors import UsageError

    with pytest.raises(UsageError, match=r"^this pool is closed, and a pool starts once: build a new one$"):
        async with pool:  # said 'pool already started'
            pass


async def test_a_small_array_refilled_after_submit_or_put_does_not_change_what_the_tasks_get(pool: Pool) -> None:
    """Arrays were read when sent, not when given: refilling one buffer between submits made
    earlier tasks sum later data (5.0 five times, and a torn 4.35), and a put value changed
    under its ref while its digest stayed. Up to 1 MiB, a writeable array is copied."""
    buf = np.empty(100_000)  # 800 kB
    futures = []
    for i in range(6):
        buf[:] = i
        futures.append(await pool.submit(Task.kernel("sum", buf)))
    assert [(await f).value / buf.size for f in futures] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]

    def refilled() -> Iterator[tuple[np.ndarray]]:
        for i in range(4):
            buf[:] = i
            yield (buf,)

    assert await pool.map("sum", refilled()) == [0.0, 100_000.0, 200_000.0, 300_000.0]
    ref = pool.put(buf)
    buf[:] = 42.0
    assert (await pool.run(Task.kernel("sum", ref))).value == 3 * 100_000.0
    np.testing.assert_array_equal(await pool.get(ref), np.full(100_000, 3.0))


async def test_a_large_array_is_read_only_while_its_tasks_use_it_and_writeable_after() -> None:
    """Copying large arrays would halve the data path: one is not copied, and a write to it
    while a task uses it raises instead of changing what the task computes."""
    big = np.zeros(300_000)  # 2.4 MB
    async with make_pool() as pool:
        future = await pool.submit(Task.kernel("sum", big))
        with pytest.raises(ValueError, match="read-only"):
            big[:] = 1.0
        assert (await future).value == 0.0
        assert big.flags.writeable  # its task is done
        big[:] = 2.0
        ref = pool.put(big)
        with pytest.raises(ValueError, match="read-only"):
            big[0] = 3.0
        assert (await pool.run(Task.kernel("sum", ref))).value == 600_000.0
        pool.drop(ref)
        assert big.flags.writeable
        pool.put(big)
        assert not big.flags.writeable
    assert big.flags.writeable  # the pool is closed: the caller's again


async def test_a_write_to_an_array_a_task_holds_is_explained_where_it_leaves_the_pool() -> None:
    """A buffer refilled while its task ran raised NumPy's bare "assignment destination is
    read-only", naming neither batuta nor the fix; a note on the error says both now. Another
    ValueError, or one raised while no array is held, gets no note."""
    big = np.zeros(300_000)
    with pytest.raises(ValueError, match="read-only") as caught:
        async with make_pool() as pool:
            await pool.submit(Task.kernel("test_echo_after", big, 0.5))
            big[:] = 1.0
    assert caught.value.__notes__ == [
        "batuta: an array of over 1 MiB given to a task stays read-only until the task is done (given to pool.put: "
        "until pool.drop), so that the task computes on what it was given (held now: float64 (300000,)); "
        "to refill a buffer while tasks use it, submit buf.copy() or fill a new array each time"
    ]
    assert big.flags.writeable
    for unrelated in (ValueError("bad value"), ValueError("assignment destination is read-only")):
        with pytest.raises(ValueError) as other:
            async with make_pool() as pool:
                if "bad" in str(unrelated):
                    await pool.submit(Task.kernel("test_echo_after", np.zeros(300_000), 0.5))
                raise unrelated
        assert not hasattr(other.value, "__notes__")


async def test_map_chunked_keeps_its_arrays_read_only_until_it_returns() -> None:
    """Its chunks are views sent without a copy: a write to the array from another coroutine
    meanwhile gave some chunks the old values and some the new, in one call's answer."""
    big = np.ones(2_000_000)
    async with make_pool() as pool:
        call = asyncio.ensure_future(pool.map_chunked("vadd", big, big, chunk_size=500_000))
        await asyncio.sleep(0)  # the call has begun and is waiting for its tasks
        with pytest.raises(ValueError, match="read-only"):
            big[:] = 2.0
        np.testing.assert_array_equal(np.concatenate(await call), np.full(2_000_000, 2.0))
        assert big.flags.writeable  # it returned: the caller's again (given twice, released twice)
        small = np.ones(10)
        assert await pool.map_chunked("sum", small, chunk_size=5) == [5.0, 5.0]
        assert small.flags.writeable


def test_an_array_stays_read_only_until_the_last_task_using_it_is_done() -> None:
    from batuta.runtime.snapshot import InFlight, read_only, taken

    held = InFlight()
    big, frozen, small = np.zeros(300_000), np.zeros(300_000), np.arange(4.0)
    frozen.flags.writeable = False
    first: list[np.ndarray] = []
    args = taken((1, frozen, [small, {"k": big}]), first, held)
    assert args[1] is frozen and args[2][1]["k"] is big and first == [big]  # neither copied
    assert args[2][0] is not small and np.array_equal(args[2][0], small)  # a small one is
    held.hold(first)
    second: list[np.ndarray] = []
    taken((big,), second, held)  # read-only now, for the first task: one more user
    held.hold(second)
    held.release(first)
    assert not big.flags.writeable
    held.release(second)
    assert big.flags.writeable and not frozen.flags.writeable
    plain = (1, "x", frozen, [frozen])
    assert taken(plain) is plain  # nothing to copy: the same objects
    view = read_only(small)
    assert not view.flags.writeable and small.flags.writeable and taken(view) is view


async def test_an_idle_coordinator_keeps_its_agents_with_keepalives() -> None:
    """Agents exit after `agent_silence_limit` without a word from the coordinator (a host cut
    off by a partition): an idle pool must still say something, or it would lose them all."""
    from batuta.runtime import events as pe

    heartbeats: list[float] = []
    lost: list[str] = []
    async with make_pool(1, heartbeat_interval=0.05, agent_silence_limit=1.0) as pool:
        pool.subscribe(lambda e: heartbeats.append(1.0) if isinstance(e, pe.HostTelemetry) else None)
        pool.subscribe(lambda e: lost.append(e.reason) if isinstance(e, pe.HostDown) else None)
        async with asyncio.timeout(60):
            while len(heartbeats) < 60:  # three seconds of an idle pool, three times the limit
                await asyncio.sleep(0.05)
        assert (await pool.run(Task.kernel("noop", 5))).value == 5
    assert lost == []  # the agent never exited: no relaunch


async def test_get_of_a_kept_value_lost_more_often_than_its_producer_may_run_says_why() -> None:
    """It said 'not fetched after 16 tries (last: )', after spinning through them with nothing
    to wait for, while a task reading the same value was told the reason."""
    from batuta.errors import ObjectLostError

    async with make_pool(1) as pool:
        [ref] = await pool.map("test_fill", [(10, 1.0)], keep=True)
        for _ in range(3):  # each kills the slot that holds the value; each loss remakes it, the third gives up
            assert (await pool.run(Task.kernel("test_crash", retry=False))).status is TaskStatus.LOST
        with pytest.raises(ObjectLostError) as info:
            await asyncio.wait_for(pool.get(ref), 60)
    said = str(info.value)
    assert said.startswith(f"object {ref.object_id}: input object {ref.object_id} was lost with a slot process")
    assert said.endswith("after its producer ran 3 time(s) (max_attempts=3)")


async def test_a_kernel_with_only_its_reference_runs_on_large_inputs_under_auto(tmp_path: Path) -> None:
    """`auto` picks "cpu" from 1,000 elements; a kernel with only its reference function (the
    README's own example) failed there: "has no 'cpu' variant; it runs on: scalar"."""
    module = tmp_path / "ref_only_kernels.py"
    module.write_text(
        "from batuta import kernel\n\n@kernel('ref_only_sum')\ndef ref_only_sum(x):\n    return float(x.sum())\n"
    )
    async with Pool.builder().cpu_workers(1).gpu_workers("none").modules([module]).build() as pool:
        small = await pool.run(Task.kernel("ref_only_sum", np.ones(10)))
        large = await pool.run(Task.kernel("ref_only_sum", np.ones(5000)))
        explicit = await pool.run(Task.kernel("ref_only_sum", np.ones(5000), backend=Backend.CPU))
    assert (small.value, large.value, explicit.value) == (10.0, 5000.0, 5000.0), large.error


async def test_a_bool_mask_of_0_and_255_goes_and_comes_back_and_the_pool_goes_on(pool: Pool) -> None:
    """Its bytes were sent as they were; the agent refused every Run frame holding it, and the
    host was relaunched about twice a second for as long as one waited."""
    mask = np.array([0, 255, 0, 3], dtype=np.uint8).view(bool)
    result = await asyncio.wait_for(pool.run(Task.kernel("noop", mask)), 60)
    assert result.is_success(), result.describe_failure()
    np.testing.assert_array_equal(result.value, [False, True, False, True])
    assert (await pool.run(Task.kernel("noop", 7))).value == 7


async def test_argument_the_wire_cannot_carry_is_refused_at_submit(pool: Pool) -> None:
    from batuta.errors import UsageError

    with pytest.raises(UsageError, match="object"):
        await pool.submit(Task.kernel("noop", object()))
    assert (await pool.run(Task.kernel("noop", 3))).value == 3


async def test_slots_share_the_cores_between_numba_threads(pool: Pool) -> None:
    threads = (await pool.run(Task.kernel("test_env", "NUMBA_NUM_THREADS"))).value
    assert threads == str(max(1, (os.cpu_count() or 1) // 2))


async def test_agent_with_another_batuta_version_is_refused_with_the_fix() -> None:
    from batuta.errors import HostUnusableError
    from batuta.runtime.session import HostSpec
    from batuta.transport.local import open_local_agent

    code = (
        "import sys, batuta._version as v; v.__version__ = '0.0.1'; "
        "from batuta.agent.main import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "--stdio", "--slots", "1", "--gpus", "none"]

    async def launch() -> object:
        return await open_local_agent(argv, name="old")

    pool = Pool([HostSpec(name="old", launch=launch)], PoolConfig(max_relaunches=0))  # type: ignore[arg-type]
    with pytest.raises(HostUnusableError, match=r"runs batuta 0\.0\.1.*`batuta cluster install --cluster FILE`"):
        await pool.start()


async def test_an_agent_that_dies_at_start_up_is_reported_with_its_last_words() -> None:
    from batuta.errors import AgentError
    from batuta.runtime.session import HostSpec
    from batuta.transport.local import open_local_agent

    argv = [sys.executable, "-m", "batuta.agent", "--stdio", "--slots", "5000", "--gpus", "none"]

    async def launch() -> object:
        return await open_local_agent(argv, name="big")

    pool = Pool([HostSpec(name="big", launch=launch)], PoolConfig(max_relaunches=0))  # type: ignore[arg-type]
    with pytest.raises(AgentError, match=r"agent exited before saying hello: .*--slots 5000: at most 1024 slots"):
        await pool.start()


async def test_an_agent_killed_as_it_exits_is_reaped_by_asyncio_alone(caplog: pytest.LogCaptureFixture) -> None:
    """The agent's EOF makes the session kill it, often before asyncio's child watcher has
    reaped it; `Process.send_signal` polled (reaped) it then, and the watcher logged "Unknown
    child process pid N, will report returncode 255" on the console. A race, hence 20 starts
    (it showed in about one start of four)."""
    from batuta.errors import AgentError
    from batuta.runtime.session import HostSpec
    from batuta.transport.local import open_local_agent

    caplog.set_level(logging.WARNING, logger="asyncio")
    streams: list[Any] = []

    async def launch() -> object:
        streams.append(await open_local_agent(["/bin/false"], name="false"))
        return streams[-1]

    for _ in range(20):
        pool = Pool([HostSpec(name="false", launch=launch)], PoolConfig(max_relaunches=0))  # type: ignore[arg-type]
        with pytest.raises(AgentError, match="agent exited before saying hello"):
            await pool.start()
    assert [await stream._process.wait() for stream in streams] == [1] * 20  # false's own code, not 255
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]


async def test_a_python_without_batuta_is_told_the_command_that_installs_it() -> None:
    """It said "No module named 'batuta'" and nothing else; the fix was only in stack check."""
    from batuta.errors import AgentError
    from batuta.runtime.session import HostSpec
    from batuta.transport.local import open_local_agent

    async def launch() -> Any:
        # isolated, without site: the python of a host where batuta is not installed
        return await open_local_agent([sys.executable, "-I", "-S", "-m", "batuta.agent", "--stdio"], name="bare")

    pool = Pool([HostSpec(name="bare", launch=launch)], PoolConfig(max_relaunches=0))
    with pytest.raises(AgentError) as info:
        await pool.start()
    assert "No module named 'batuta'" in str(info.value)
    assert str(info.value).endswith(
        "; install it there with `batuta cluster install --cluster FILE`, or set bootstrap = true for the host"
    )


def test_another_python_minor_is_accepted_and_another_batuta_refused() -> None:
    """The wire is msgpack with its own schema, so only batuta's version must match."""
    import platform

    from batuta.protocol import messages as m
    from batuta.runtime.session import HostSession, HostSpec

    session = HostSession(spec=HostSpec(name="h", launch=None), listener=None, heartbeat_interval=1.0)  # type: ignore[arg-type]
    major, minor, _ = platform.python_version_tuple()

    def hello(batuta_version: str, python_version: str) -> m.Hello:
        return m.Hello(
            protocol=m.PROTOCOL_VERSION,
            batuta_version=batuta_version,
            python_version=python_version,
            hostname="h",
            pid=1,
            cpu_count=1,
            slots=(),
        )

    assert session._check_hello(hello(batuta.__version__, f"{major}.{int(minor) + 1}.0")) == ""
    assert session._check_hello(hello(batuta.__version__, f"{major}.{int(minor) - 1}.3")) == ""
    problem = session._check_hello(hello("0.0.1", f"{major}.{minor}.0"))
    assert "runs batuta 0.0.1" in problem and "batuta cluster install --cluster FILE" in problem
    assert "pip install" not in problem


async def test_jobs_label_tasks_and_cancel_together(pool: Pool) -> None:
    queued: list[str] = []
    pool.subscribe(lambda e: queued.append(e.job) if isinstance(e, pe.TaskQueued) else None)
    with pool.job("slow"):
        slow = [await pool.submit(Task.kernel("spin", 30.0)) for _ in range(3)]
    fast = await pool.submit(Task.kernel("noop", 1))
    assert queued == ["slow", "slow", "slow", ""]
    assert pool.cancel_job("slow") == 3
    results = [await asyncio.wait_for(f, 30) for f in slow]
    assert all(r.status is TaskStatus.CANCELLED and r.job == "slow" for r in results)
    done = await fast
    assert done.value == 1 and done.job == "" and "scalar" in done.backend_reason


async def test_auto_sends_big_quadratic_work_to_a_gpu_slot_and_says_why() -> None:
    env = {"BATUTA_FAKE_GPUS": "1", "PYTHONPATH": str(REPO)}
    async with Pool([local_host(1, gpus="auto", env=env)], PoolConfig()) as pool:
        x = np.ones((400, 300), dtype=np.float32)  # 120,000 elements, pairwise is O(n^2)
        big = await pool.run(Task.kernel("pairwise_distances", x, x))
        small = await pool.run(Task.kernel("pairwise_distances", x[:2, :2], x[:2, :2]))
        linear = await pool.run(Task.kernel("vadd", x.ravel(), x.ravel()))
    assert big.backend is Backend.GPU and "O(n^2)" in big.backend_reason
    assert big.slot == "local/1" and big.device.startswith("Fake GPU 0 (")  # the fake GPU's slot
    assert small.backend is Backend.SCALAR and small.device == ""
    assert linear.backend is Backend.CPU and linear.is_success()


async def test_a_module_kernel_name_is_never_imported_by_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Task.kernel("mod:kernel")` imported `mod` in the coordinator at submit (to learn its
    complexity): its top level ran there, blocking the event loop for the import."""
    (tmp_path / "hosts_only_mod.py").write_text(
        "from batuta.kernels import kernel\n\n@kernel('hosts_only_add')\ndef add(x):\n    return x + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here too: it must still not be imported
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    async with Pool([local_host(1, gpus="none", env=env)], PoolConfig()) as pool:
        result = await pool.run(Task.kernel("hosts_only_mod:hosts_only_add", 41))
    assert result.value == 42, result.error
    assert "hosts_only_mod" not in sys.modules


async def test_a_gpu_task_where_no_host_has_a_gpu_says_how_to_try_without_one() -> None:
    """`batuta run kmeans --backend gpu` on a laptop said "the cluster offers: cpu" only."""
    env = {"BATUTA_FAKE_GPUS": "0", "PYTHONPATH": str(REPO)}  # a host without a GPU, on any machine
    async with Pool([local_host(1, gpus="auto", env=env)], PoolConfig()) as pool:
        result = await pool.run(Task.kernel("sum", np.ones(8), backend=Backend.GPU))
    assert result.status is TaskStatus.UNSCHEDULABLE
    assert (result.error or "").endswith(
        "; no host here has a GPU ('batuta stack check' says why); to try GPU code without one, run under "
        "numba's simulator with fake GPUs: NUMBA_ENABLE_CUDASIM=1 BATUTA_FAKE_GPUS=2 (slow)"
    )


async def test_each_gpu_of_a_host_can_be_asked_for_by_its_index() -> None:
    env = {"BATUTA_FAKE_GPUS": "2", "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(REPO)}
    async with Pool([local_host(1, gpus="auto", env=env)], PoolConfig()) as pool:
        x = np.ones(64, dtype=np.float32)
        asked = (1, 0, 1)
        results = [
            await pool.run(Task.kernel("sum", x, backend=Backend.GPU, requires=[gpu_capability(i)])) for i in asked
        ]
        nowhere = await pool.run(Task.kernel("sum", x, backend=Backend.GPU, requires=[gpu_capability(2)]))
        # as the README writes it, with no backend: AUTO picked scalar and found no CPU slot of GPU 1
        as_written = await pool.run(Task.kernel("sum", x, requires=["gpu:1"]))
    assert as_written.device.startswith("Fake GPU 1 (") and as_written.value == 64.0, as_written.error
    assert [r.device.split(" (")[0] for r in results] == [f"Fake GPU {i}" for i in asked]
    # cards of one model have one name: the device says which GPU of the host it was
    assert [r.device.rsplit(", ", 1)[-1] for r in results] == [f"GPU {i})" for i in asked]
    assert [r.value for r in results] == [64.0] * 3
    assert nowhere.status is TaskStatus.UNSCHEDULABLE and "gpu:2" in (nowhere.error or "")


def test_a_pool_of_more_slots_than_an_agent_runs_is_refused_up_front() -> None:
    with pytest.raises(batuta.errors.UsageError, match=r"cpu_workers\(2000\): one agent runs at most 1024 slots"):
        Pool.builder().cpu_workers(2000)


def test_window_bounds_are_checked_where_they_are_given() -> None:
    for bad, match in (
        ({"min_window": 0}, r"window\(min_window=0\): give a positive number of tasks"),
        ({"max_window": 2.5}, r"window\(max_window=2.5\): give a positive number of tasks"),
        ({"min_window": 8, "max_window": 4}, r"min_window=8, max_window=4\): min_window must not exceed max_window"),
        ({"min_window": 65}, r"min_window=65, max_window=64\)"),
    ):
        with pytest.raises(batuta.errors.UsageError, match=match):
            Pool.builder().window(**bad)
    Pool.builder().window(min_window=1, max_window=1).build()  # a window of one is allowed
