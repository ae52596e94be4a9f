"""A GPU slot's device cache, from the slot's `GpuCache` to the agent's heartbeats.

The agent runs in this process, with `FakeTelemetry` GPUs and slot processes the test plays
itself (as in test_agent_supervisor.py): each "slot" is a pair of pipes and a `sleep` in its
own session, so the agent's kills hit something real; every one is killed by PID afterwards.
The coordinator's end is a `Connection` over two more pipes. No sleeps: the test waits on
heartbeats, which a short heartbeat interval makes frequent, each wait bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batuta.agent import supervisor
from batuta.agent.agent import Agent
from batuta.agent.options import AgentOptions, GpuSelection
from batuta.agent.spawn import SPAWN_ENV
from batuta.agent.telemetry import FakeTelemetry, with_device_caches
from batuta.protocol.codec import encode_message
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    SLOT_UP,
    GpuCache,
    GpuSample,
    Heartbeat,
    Hello,
    Message,
    Shutdown,
    SlotChanged,
    SlotInfo,
    Welcome,
)

WAIT_S = 20.0
MIB = 1 << 20


@dataclass
class PlayedSlot:
    """The far end of one spawned "slot process": the test writes what the slot would say."""

    proc: subprocess.Popen[bytes]
    frames_in: int  # what the agent writes to the slot (drained, never read)
    frames_out: int  # what the agent reads from the slot

    def send(self, message: Message) -> None:
        os.write(self.frames_out, encode_message(message))

    def hang_up(self) -> None:
        """End of stream, as when the process dies: the agent treats the slot as dead."""
        with contextlib.suppress(OSError):
            os.close(self.frames_out)

    def close(self) -> None:
        for fd in (self.frames_in, self.frames_out):
            with contextlib.suppress(OSError):
                os.close(fd)


class Coordinator:
    """The coordinator's end of the agent's stream: collects what the agent sends."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.conn = Connection(Role.COORDINATOR)
        self.messages: list[Message] = []
        self._read_fd, self._write_fd = read_fd, write_fd
        self._changed = asyncio.Event()
        os.set_blocking(read_fd, False)
        asyncio.get_running_loop().add_reader(read_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._read_fd, 1 << 20)
        except BlockingIOError:
            return
        if not data:
            asyncio.get_running_loop().remove_reader(self._read_fd)
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            if event is CLOSED:
                break
            self.messages.append(event)
        self._changed.set()

    def send(self, message: Message) -> None:
        os.write(self._write_fd, self.conn.send(message))

    async def until(self, found: Callable[[], Any], what: str) -> Any:
        async with asyncio.timeout(WAIT_S):
            while not (value := found()):
                self._changed.clear()
                await self._changed.wait()
        return value

    async def heartbeat(self, where: Callable[[Heartbeat], bool], what: str) -> Heartbeat:
        seen = len(self.messages)

        def newer() -> Heartbeat | None:
            return next((m for m in self.messages[seen:] if isinstance(m, Heartbeat) and where(m)), None)

        try:
            beat: Heartbeat = await self.until(newer, what)
        except TimeoutError:
            beats = [m for m in self.messages if isinstance(m, Heartbeat)][-3:]
            raise AssertionError(f"no heartbeat with {what} within {WAIT_S} s; last: {beats}") from None
        return beat

    def close(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self._read_fd)
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def caches(beat: Heartbeat) -> dict[int, tuple[int, int, int]]:
    return {g.index: (g.cached_values, g.cached_bytes, g.cache_cap) for g in beat.gpus}


async def test_gpu_cache_reports_are_summed_per_gpu_into_heartbeats_and_go_with_their_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spawned: dict[int, list[PlayedSlot]] = {}

    def fake_spawn_slot(*, slot: int, **_: Any) -> tuple[subprocess.Popen[bytes], int, int, int]:
        to_slot_r, to_slot_w = os.pipe()
        from_slot_r, from_slot_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        os.close(stderr_w)  # says nothing on stderr
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        played = PlayedSlot(proc, to_slot_r, from_slot_w)
        spawned.setdefault(slot, []).append(played)
        played.send(SlotChanged(slot=slot, state=SLOT_UP))
        return proc, to_slot_w, from_slot_r, stderr_r

    monkeypatch.setattr(supervisor, "spawn_slot", fake_spawn_slot)
    monkeypatch.setenv(SPAWN_ENV, "exec")  # no fork preloading into the test process
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    telemetry = FakeTelemetry(2)
    gpus = telemetry.gpu_infos()
    agent_in_r, coordinator_w = os.pipe()
    coordinator_r, agent_out_w = os.pipe()
    agent = Agent(
        AgentOptions(cpu_slots=1, gpus=GpuSelection(mode="auto")),
        telemetry,
        frames_in=agent_in_r,
        frames_out=agent_out_w,
        gpus=gpus,
        gpu_slots=((gpus[0], {}), (gpus[1], {}), (gpus[1], {})),  # slots 1 (GPU 0), 2 and 3 (GPU 1)
    )
    coordinator = Coordinator(coordinator_r, coordinator_w)
    running = asyncio.create_task(agent.run())
    try:
        hello = await coordinator.until(
            lambda: next((m for m in coordinator.messages if isinstance(m, Hello)), None), "Hello"
        )
        assert [(s.slot, s.gpu_index) for s in hello.slots] == [(0, None), (1, 0), (2, 1), (3, 1)]
        coordinator.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=0.05))
        first = await coordinator.heartbeat(lambda b: True, "any GPU")
        assert caches(first) == {0: (0, 0, 0), 1: (0, 0, 0)}  # no slot has reported a cache yet

        await coordinator.until(lambda: len(spawned) == 4, "every slot spawned")
        spawned[1][0].send(GpuCache(slot=1, values=2, nbytes=300 * MIB, cap=8 << 30))
        spawned[2][0].send(GpuCache(slot=2, values=1, nbytes=100 * MIB, cap=4 << 30))
        spawned[3][0].send(GpuCache(slot=3, values=3, nbytes=50 * MIB, cap=4 << 30))
        want = {0: (2, 300 * MIB, 8 << 30), 1: (4, 150 * MIB, 8 << 30)}
        beat = await coordinator.heartbeat(lambda b: caches(b) == want, f"caches {want}")
        assert [g.utilization is not None for g in beat.gpus] == [True, True]  # NVML's fields kept

        spawned[2][0].send(GpuCache(slot=2, values=0, nbytes=0, cap=4 << 30))  # the latest report wins
        want = {0: (2, 300 * MIB, 8 << 30), 1: (3, 50 * MIB, 8 << 30)}
        await coordinator.heartbeat(lambda b: caches(b) == want, f"caches {want}")

        spawned[1][0].hang_up()  # slot 1's process dies: its device memory is gone with it
        want = {0: (0, 0, 0), 1: (3, 50 * MIB, 8 << 30)}
        await coordinator.heartbeat(lambda b: caches(b) == want, f"caches {want} after slot 1 died")
        assert len(spawned[1]) == 2  # restarted; the new process has reported nothing

        coordinator.send(Shutdown(reason="test over"))
        async with asyncio.timeout(WAIT_S):
            assert await running == 0
    finally:
        if not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
        coordinator.close()
        for played in (p for group in spawned.values() for p in group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(played.proc.pid, signal.SIGKILL)
            played.proc.wait(10)
            played.close()
        for fd in (agent_in_r, agent_out_w):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Slot:
    info: SlotInfo
    gpu_cache: GpuCache | None


def test_a_gpu_without_a_reading_of_its_own_still_shows_its_cache() -> None:
    slots = [
        Slot(SlotInfo(slot=0, capabilities=("cpu",)), None),
        Slot(SlotInfo(slot=1, capabilities=("gpu",), gpu_index=0), None),  # has not reported yet
        Slot(SlotInfo(slot=2, capabilities=("gpu",), gpu_index=3), GpuCache(slot=2, values=1, nbytes=7, cap=9)),
    ]
    read = GpuSample(index=0, utilization=50.0)
    assert with_device_caches((read,), slots) == (
        read,
        GpuSample(index=3, cached_values=1, cached_bytes=7, cache_cap=9),  # no NVML reading: only the cache
    )
    assert with_device_caches((read,), slots[:2]) == (read,)


async def test_a_telemetry_failure_is_said_once_not_at_every_heartbeat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Out of file descriptors, the agent printed "telemetry failed" every half second."""

    class Failing(FakeTelemetry):
        def sample(self) -> Any:
            raise OSError(24, "Too many open files")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    agent_in_r, coordinator_w = os.pipe()
    coordinator_r, agent_out_w = os.pipe()
    agent = Agent(
        AgentOptions(cpu_slots=0, gpus=GpuSelection(mode="none")),
        Failing(0),
        frames_in=agent_in_r,
        frames_out=agent_out_w,
        gpus=(),
        gpu_slots=(),
    )
    agent._loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            agent._heartbeat()
    finally:
        if agent._heartbeat_timer is not None:
            agent._heartbeat_timer.cancel()
        for fd in (agent_in_r, coordinator_w, coordinator_r, agent_out_w):
            os.close(fd)
    said = [line for line in capfd.readouterr().err.splitlines() if "telemetry failed" in line]
    assert said == ["batuta agent: telemetry failed: [Errno 24] Too many open files (said again only if it changes)"]
