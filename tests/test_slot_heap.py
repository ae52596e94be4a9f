"""A slot reuses the memory its tasks freed: big arrays come from its heap, not fresh mappings."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batuta import Task
from batuta.agent import heap
from tests.test_pool import make_pool

REPO = Path(__file__).resolve().parent.parent
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
