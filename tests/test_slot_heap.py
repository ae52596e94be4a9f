"""A slot reuses the memory its tasks freed: big arrays come from its heap, not fresh mappings."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from batuta import Task
from batuta.agent import heap
from tests.test_pool import make_pool

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 20.0
glibc_only = pytest.mark.skipif(heap._glibc() is None, reason="the heap settings are glibc's")


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@glibc_only
def test_a_big_array_freed_is_reused_from_the_heap_until_trimmed() -> None:
    out = _run(
        """
        import numpy as np
        from batuta.agent import heap
        from tests.support.heap import in_heap
        before = in_heap(np.empty(64 << 20, dtype=np.uint8))
        assert heap.keep_freed_memory()
        first = np.empty(64 << 20, dtype=np.uint8)
        first[:] = 1
        where = first.__array_interface__["data"][0]
        del first
        second = np.empty(64 << 20, dtype=np.uint8)
        again = second.__array_interface__["data"][0] == where
        second[:] = 1
        del second
        import psutil
        held = psutil.Process().memory_info().rss  # freed, but kept for the next array
        heap.release_freed_memory()
        given_back = held - psutil.Process().memory_info().rss
        print(before, in_heap(np.empty(64 << 20, dtype=np.uint8)), again, given_back > 48 << 20)
        """
    )
    # glibc's default maps it; then the heap serves it, the same memory again, until trimmed
    assert out == "False True True True"


@glibc_only
@pytest.mark.parametrize("spawn", ["fork", "exec"])
async def test_slots_allocate_big_arrays_from_their_heap(monkeypatch: pytest.MonkeyPatch, spawn: str) -> None:
    monkeypatch.setenv("BATUTA_SLOT_SPAWN", spawn)
    async with make_pool(slots=1) as pool:
        result = await pool.run(Task.kernel("test_heap"))
    assert result.is_success(), result.error
    assert result.value is True


async def _until_rss(pid: int, below: int, what: str) -> int:
    """Wait (bounded) until process `pid`'s resident set is under `below` bytes; its last reading."""
    rss = psutil.Process(pid).memory_info().rss
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(WAIT_S):
            while rss >= below:
                await asyncio.sleep(0.05)
                rss = psutil.Process(pid).memory_info().rss
    assert rss < below, f"{what}: {rss:,} bytes resident, not under {below:,}"
    return rss


@glibc_only
async def test_a_slot_gives_back_a_dropped_kept_value_once_idle() -> None:
    """A kept result lives in its slot's heap; dropping it freed it there, but the slot trimmed
    its heap only after a task ran, so a dropped 2 GiB result stayed resident in an idle slot
    until its next task (seen on an SSH host: 2,073 MiB held for good after `pool.drop`)."""
    n = 8 << 20  # 64 MiB of float64: under heap.TRIM_BYTES, so only a trim gives it back
    nbytes = n * 8
    async with asyncio.timeout(3 * WAIT_S), make_pool(slots=1) as pool:
        pid = (await pool.run(Task.kernel("test_pid"))).unwrap()
        base = psutil.Process(pid).memory_info().rss
        ref = (await (await pool.submit(Task.kernel("test_fill_after_scratch", n), keep=True))).unwrap()
        # the idle trim after the task gave the scratch back: the kept value alone is held
        held = await _until_rss(pid, base + nbytes + nbytes // 2, "the slot trimmed its heap after the task")
        assert held > base + nbytes // 2, "the kept value is in the slot"
        pool.drop(ref)
        await _until_rss(pid, base + nbytes // 2, "the dropped value went back to the system")
