"""Values of any size over a real SSH link (tests/support/hosts.py namespace hosts).

A value over the old 256 MiB frame limit goes to an SSH host as a put and comes back as a
result, both ways as streams of chunks; meanwhile the host's heartbeats keep arriving (some
while the result is half received), another task completes, and liveness never suspects
the host. The 8 GiB variant (an argument, in; its fingerprint, out) is marked slow and runs
when asked (BATUTA_TEST_8_GIB=1) and memory and disk allow; it skips saying why otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from batuta.core.task import Task, TaskStatus
from batuta.protocol.codec import DEFAULT_MAX_FRAME_BYTES
from batuta.runtime import events as pe
from batuta.runtime.cluster import ClusterHost, ssh_host
from batuta.runtime.pool import Pool, PoolConfig
from batuta.runtime.session import HostSession
from tests.support.hosts import TestHosts
from tests.test_ssh_transport import settings_for

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 600.0  # hundreds of megabytes through sshd on a loaded 2-core box


def _pool(hosts: TestHosts) -> Pool:
    host = hosts[0]
    cluster_host = ClusterHost(
        name=host.name,
        address=host.name,
        python=sys.executable,
        slots=2,
        gpus="none",
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        kernel_modules=("tests.support.transfer_kernels",),
    )
    return Pool([ssh_host(cluster_host, settings_for(hosts))], PoolConfig(heartbeat_interval=0.25))


class Watch:
    """What the pool said during the transfer: heartbeats (and whether a result was then
    half received), task completions, host state changes."""

    def __init__(self, session: HostSession) -> None:
        self.session = session
        self.heartbeats = 0
        self.heartbeats_mid_transfer = 0
        self.finished: list[str] = []
        self.states: list[str] = []

    def __call__(self, event: object) -> None:
        if isinstance(event, pe.HostTelemetry):
            self.heartbeats += 1
            if self.session.receiving_bytes > 0:
                self.heartbeats_mid_transfer += 1
        elif isinstance(event, pe.TaskFinished):
            self.finished.append(event.result.name)
        elif isinstance(event, pe.HostStateChanged):
            self.states.append(event.state)
        elif isinstance(event, pe.HostDown):
            self.states.append("lost")


async def _until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


async def _move_both_ways(hosts: TestHosts, value: np.ndarray) -> None:
    async with asyncio.timeout(WAIT_S), _pool(hosts) as pool:
        (session,) = pool._hosts.sessions.values()
        watch = Watch(session)
        pool.subscribe(watch)
        ref = pool.put(value)
        big = await pool.submit(Task.kernel("test_reversed", ref))
        await _until(lambda: session.sending_bytes > 0, "the put began streaming")
        small = await pool.run(Task.kernel("noop", 5))  # its Run and its result overtake the transfer
        assert small.value == 5 and not big.done()
        await _until(lambda: session.receiving_bytes > 0 or big.done(), "the result began streaming")
        result = await big
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.value.shape == value.shape and result.value.dtype == value.dtype
        assert np.array_equal(result.value[:: 1 << 16], value[::-1][:: 1 << 16])
        assert result.value[0] == value[-1] and result.value[-1] == value[0]
        assert watch.finished[:2] == ["noop", "test_reversed"]
        assert watch.heartbeats_mid_transfer > 0  # heartbeats came between the result's chunks
        assert "suspected" not in watch.states and "lost" not in watch.states, watch.states
        assert result.attempts == 1
        assert session.receiving_bytes == 0 and session.sending_bytes == 0


@pytest.mark.timeout(WAIT_S + 60)  # pytest-timeout's own limit would interrupt the pool mid-transfer
async def test_a_value_over_the_old_frame_limit_goes_to_an_ssh_host_and_back(
    ssh_hosts: Callable[..., TestHosts],
) -> None:
    hosts = ssh_hosts(1)
    count = DEFAULT_MAX_FRAME_BYTES // 8 + 4096  # just over 256 MiB of float64
    await _move_both_ways(hosts, np.arange(count, dtype=np.float64))


EIGHT_GIB = 8 * 2**30


@pytest.mark.slow
@pytest.mark.timeout(3 * WAIT_S + 60)
async def test_an_8_gib_argument_goes_to_an_ssh_host_with_heartbeats_on_time(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path
) -> None:
    # The value is a memory-mapped .npy (the coordinator streams it from the page cache);
    # the agent receives it into shared memory that the slot maps: about 8 GiB in all.
    if os.environ.get("BATUTA_TEST_8_GIB") != "1":
        pytest.skip("moves 8 GiB through memory and disk: set BATUTA_TEST_8_GIB=1 to run it")
    needed = EIGHT_GIB + 4 * 2**30
    available = psutil.virtual_memory().available
    if available < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free memory, this machine has {available / 2**30:.1f} GiB")
    if shutil.disk_usage(tmp_path).free < EIGHT_GIB + 2**30:
        pytest.skip(f"needs {EIGHT_GIB / 2**30 + 1:.0f} GiB free under {tmp_path} for the .npy")
    count = EIGHT_GIB // 8
    path = tmp_path / "eight.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(count,))
    step = 1 << 24
    for start in range(0, count, step):
        out[start : start + step] = np.arange(start, min(start + step, count), dtype=np.float64)
    out.flush()
    del out
    value = np.load(path, mmap_mode="r")
    hosts = ssh_hosts(1)
    async with asyncio.timeout(WAIT_S * 3), _pool(hosts) as pool:
        (session,) = pool._hosts.sessions.values()
        watch = Watch(session)
        pool.subscribe(watch)
        big = await pool.submit(Task.kernel("test_fingerprint", value))
        await _until(lambda: session.sending_bytes > 0, "the argument began streaming")
        small = await pool.run(Task.kernel("noop", 5))
        assert small.value == 5 and not big.done()
        result = await big
        assert result.status is TaskStatus.SUCCEEDED, result.error
        assert result.value == ("<f8", (count,), float(count * (count - 1) // 2), float(count - 1))
        assert watch.heartbeats > 0 and watch.finished[:2] == ["noop", "test_fingerprint"]
        assert "suspected" not in watch.states and "lost" not in watch.states, watch.states
        assert result.attempts == 1
