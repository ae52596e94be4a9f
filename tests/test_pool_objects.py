"""`pool.put` / `pool.drop` (a value sent to each host once and named by many tasks), and how
submissions become Run messages."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator

import numpy as np
import pytest

from batuta import Backend, ObjectRef, Pool, Task, TaskStatus
from batuta.errors import UsageError
from batuta.protocol import messages as m
from batuta.runtime.session import HostSession
from tests.test_pool import agent_pids, make_pool


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with make_pool() as p:
        yield p


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[m.Message]:
    """Every message the coordinator queues for an agent, in order."""
    messages: list[m.Message] = []
    original = HostSession.send

    def spy(self: HostSession, message: m.Message, nbytes: int = 0) -> None:
        messages.append(message)
        original(self, message, nbytes)

    monkeypatch.setattr(HostSession, "send", spy)
    return messages


async def test_a_put_value_goes_to_the_host_once_and_every_task_gets_it(pool: Pool, sent: list[m.Message]) -> None:
    x = np.arange(200_000, dtype=np.float64)
    ref = pool.put(x)
    assert isinstance(ref, ObjectRef) and ref.size == x.size
    # described as a kept array is (it read shape (), dtype '' and its encoded frame's bytes)
    assert (ref.nbytes, ref.shape, ref.dtype, repr(ref)) == (
        x.nbytes,
        (200_000,),
        "<f8",
        "ObjectRef(1, 1,600,000 bytes)",
    )
    other = pool.put({"k": [1, 2]})
    assert (other.shape, other.dtype) == ((), "") and other.nbytes > 0  # not an array: its encoded size
    results = await asyncio.gather(*(pool.run(Task.kernel("sum", ref, backend=Backend.CPU)) for _ in range(40)))
    assert all(r.status is TaskStatus.SUCCEEDED and r.value == pytest.approx(x.sum()) for r in results)
    puts = [msg for msg in sent if isinstance(msg, m.Put)]
    assert len(puts) == 1 and puts[0].object_id == ref.object_id  # one host, one copy
    first_run = next(i for i, msg in enumerate(sent) if isinstance(msg, m.Run))
    assert sent.index(puts[0]) < first_run  # the value precedes the first task that names it


async def test_refs_may_sit_anywhere_in_the_arguments(pool: Pool) -> None:
    a, b = np.ones(5_000, dtype=np.float32), np.full(5_000, 2.0, dtype=np.float32)
    ref_a, ref_b = pool.put(a), pool.put(b)
    result = await pool.run(Task.kernel("vadd", ref_a, ref_b, backend=Backend.CPU))
    assert result.is_success(), result.error
    assert np.array_equal(result.value, a + b)
    mixed = await pool.run(Task.kernel("saxpy", 3.0, ref_a, b, backend=Backend.CPU))
    assert np.array_equal(mixed.value, 3.0 * a + b)


async def test_auto_sizes_a_task_by_what_its_refs_hold(pool: Pool) -> None:
    small, large = pool.put(np.ones(10)), pool.put(np.ones(100_000))
    assert (await pool.run(Task.kernel("sum", small))).backend is Backend.SCALAR
    assert (await pool.run(Task.kernel("sum", large))).backend is Backend.CPU


async def test_drop_waits_for_the_tasks_that_still_name_it(pool: Pool, sent: list[m.Message]) -> None:
    ref = pool.put(np.arange(10.0))
    slow = await pool.submit(Task.kernel("test_echo_after", ref, 0.3))
    pool.drop(ref)  # while the task is queued or running
    result = await asyncio.wait_for(slow, 30)
    assert result.is_success() and np.array_equal(result.value, np.arange(10.0))
    drops = [msg for msg in sent if isinstance(msg, m.Drop)]
    assert drops == [m.Drop(object_ids=(ref.object_id,))]  # released on the host after its user resolved
    with pytest.raises(UsageError, match=rf"names object {ref.object_id}, which this pool does not hold"):
        pool.submit_nowait(Task.kernel("sum", ref))


async def test_a_dropped_put_array_stays_read_only_until_the_tasks_naming_it_resolve(pool: Pool) -> None:
    """`pool.drop` made a put's arrays writable at once, while tasks naming it were still to be
    sent: a refill then reached a host not yet sent the value (the Put is encoded from the array
    when the first task naming it goes there)."""
    x = np.arange(200_000, dtype=np.float64)
    ref = pool.put(x)
    future = pool.submit_nowait(Task.kernel("sum", ref, backend=Backend.CPU))
    pool.drop(ref)  # no loop turn since the submission: the task has not been sent yet
    assert not x.flags.writeable
    result = await asyncio.wait_for(future, 30)
    assert result.is_success() and result.value == pytest.approx(np.arange(200_000.0).sum())
    assert x.flags.writeable  # its last user resolved: the caller's to change again


async def test_an_unusable_value_or_ref_is_a_usage_error(pool: Pool) -> None:
    with pytest.raises(UsageError, match=r"pool\.put: .*cannot send a value of type"):
        pool.put(object())
    with pytest.raises(UsageError, match=r"pool\.drop takes an ObjectRef \(from pool\.put or keep=True\), not str"):
        pool.drop("not a ref")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"names ObjectRef\(999\), which no pool made"):
        pool.submit_nowait(Task.kernel("sum", ObjectRef(999)))


async def test_a_put_of_too_much_in_frame_data_says_what_to_do_as_an_argument_would(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 MiB of bytes: as an argument, "send bulk data as numpy arrays"; through pool.put,
    only "Put frame of ... exceeds the ...-byte limit"."""
    import batuta.protocol._values as values

    monkeypatch.setattr(values, "MAX_INBAND_BYTES", 1 << 20)
    with pytest.raises(UsageError) as info:
        pool.put(b"x" * (2 << 20))
    assert str(info.value) == (
        "pool.put: about 2 MiB of str, bytes, small arrays and list items, more than one frame carries (1 MiB); "
        "send bulk data as numpy arrays (bytes: np.frombuffer(data, np.uint8); many small arrays: one stacked "
        "array), which travel beside the frame"
    )


async def test_a_ref_of_another_pool_is_refused_not_read_as_this_pools_object() -> None:
    """Ids count from 1 in every pool: B ran A's ref with B's object 1 (a wrong answer), got
    B's value for it, and its drop freed B's own object."""
    async with make_pool() as a, make_pool() as b:
        of_a, of_b = a.put(np.full(4, 1.0)), b.put(np.full(4, 1000.0))
        assert of_a.object_id == of_b.object_id and of_a != of_b
        kept_a = await (await a.submit(Task.kernel("sum", of_a), keep=True))
        another = "a value of another pool (its id means another value in this one)"
        with pytest.raises(UsageError, match=re.escape(f"task 'sum' names {of_a!r}, {another}")):
            b.submit_nowait(Task.kernel("sum", of_a))
        for ref in (of_a, kept_a.value):
            with pytest.raises(UsageError, match=re.escape(f"pool.get names {ref!r}, {another}")):
                await b.get(ref)
            with pytest.raises(UsageError, match=re.escape(f"pool.drop names {ref!r}, {another}")):
                b.drop(ref)
        assert (await b.run(Task.kernel("sum", of_b))).value == 4000.0  # B's own object is still there
        assert (await a.run(Task.kernel("sum", of_a))).value == 4.0


async def test_a_relaunched_agent_gets_the_value_again() -> None:
    async with make_pool(relaunch_backoff=0.1) as pool:
        ref = pool.put(np.arange(1000.0))
        assert (await pool.run(Task.kernel("sum", ref))).value == pytest.approx(499_500.0)
        [agent] = agent_pids()
        os.kill(agent.pid, signal.SIGKILL)
        result = await asyncio.wait_for(pool.run(Task.kernel("sum", ref, max_attempts=5)), 60)
        assert result.is_success(), result.error
        assert result.value == pytest.approx(499_500.0)


async def test_a_restarted_slot_process_gets_the_value_again(pool: Pool) -> None:
    ref = pool.put(np.arange(1000.0))
    assert (await pool.run(Task.kernel("sum", ref))).value == pytest.approx(499_500.0)
    crashed = await pool.run(Task.kernel("test_crash", max_attempts=1))  # kills whichever slot runs it
    assert crashed.status is not TaskStatus.SUCCEEDED
    results = await asyncio.gather(*(pool.run(Task.kernel("sum", ref)) for _ in range(8)))
    assert all(r.is_success() and r.value == pytest.approx(499_500.0) for r in results), [r.error for r in results]


async def test_a_burst_of_submissions_goes_to_a_slot_in_one_run(pool: Pool, sent: list[m.Message]) -> None:
    """Submissions of one loop turn are scheduled together: the first Run to a hungry slot
    carries a window's worth of tasks, not one task per message."""
    futures = [pool.submit_nowait(Task.kernel("noop", i)) for i in range(16)]
    assert [(await f).value for f in futures] == list(range(16))
    runs = [msg for msg in sent if isinstance(msg, m.Run)]
    assert len(runs[0].tasks) > 1
