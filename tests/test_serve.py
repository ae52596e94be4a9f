"""Served coordinators (batuta/runtime/serve*.py, batuta/jobs/_serve.py, batuta/cli/_serve.py).

A real local pool runs noop tasks while viewers attach over the Unix socket: two at once,
one that stops reading, one killed with SIGKILL, one running as another uid. The snapshot
a late viewer restores is checked against a model fed every event from the start. Waits
are on conditions with bounded timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from batuta.tui.attach import apply_items, restore
from batuta.tui.histogram import bucket_of as dashboard_bucket_of
from batuta.tui.model import DashboardModel
from batuta.tui.replay import SyntheticCluster, replay

from batuta import Pool
from batuta.cli import main as cli_main
from batuta.errors import ServeError, UsageError, ViewerProtocolError
from batuta.runtime import events as pe
from batuta.runtime import serve_paths
from batuta.runtime import serve_wire as w
from batuta.runtime.serve import CoordinatorServer
from batuta.runtime.serve_client import Connection, Target, ask_info, connect, parse_target
from batuta.runtime.serve_history import RAW_TASK_ITEMS, ViewerHistory, bucket_of

T0 = 1000.0


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime folder, `batuta` in a fresh one, with a short path (Unix socket paths
    are limited to 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="bt"))
    monkeypatch.setenv("BATUTA_RUNTIME_DIR", str(folder / "batuta"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


class _Stop:
    def __init__(self) -> None:
        self.stopped = False
        self.cancelled: list[str] = []
        self.on_stop: Callable[[], object] | None = None  # what a real coordinator does then: end

    def cancel_job(self, name: str) -> int:
        self.cancelled.append(name)
        return 0

    def stop(self) -> None:
        self.stopped = True
        if self.on_stop is not None:
            self.on_stop()


@contextlib.asynccontextmanager
async def served_pool(**options: Any) -> AsyncIterator[tuple[Pool, CoordinatorServer]]:
    pool = Pool.builder().cpu_workers(2).seed(0).build()
    server = CoordinatorServer(pool, name="t", job="spin", controls=_Stop(), flush_s=0.02, **options)
    await server.start()
    try:
        await pool.start()
        server.set_state("running")
        yield pool, server
    finally:
        await server.close()
        await pool.close()


async def run_noops(pool: Pool, count: int) -> None:
    with pool.job("spin"):
        results = await pool.map("noop", range(count))
    assert len(results) == count


class Viewer:
    """A headless viewer: a model fed from the stream, as tui/attach.py feeds it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.model = DashboardModel(clock=time.monotonic)
        self.snapshots = 0
        self.ended = asyncio.Event()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        await self.connection.send(["attach", w.VERSION])
        while (message := await self.connection.receive()) is not None:
            if message[0] == "snapshot":
                restore(self.model, message[1])
                self.snapshots += 1
            elif message[0] == "events":
                apply_items(self.model, w.decode_items(message[1], "events"))
                self.model.drain()
        self.ended.set()

    def succeeded(self) -> int:
        self.model.drain()
        return self.model.totals.succeeded

    async def close(self) -> None:
        await self.connection.close()
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


# -- the wire and the history -------------------------------------------------------------------


def test_history_buckets_are_the_dashboards() -> None:
    for exponent in range(-80, 40):
        seconds = 10 ** (exponent / 10)
        assert bucket_of(seconds) == dashboard_bucket_of(seconds), seconds
    assert bucket_of(0.0) == dashboard_bucket_of(0.0)


@pytest.mark.parametrize(
    ("wire", "named"),
    [
        ([w.STARTED, 1, "noop", 7, "h/0", 1, 2.0, ""], "events[0].host: expected str, got int"),
        ([w.FINISHED, 1, "noop", "weird", None, 0.1, 0.1, "h", "h/0", 1, "cpu", "", b"", 2.0], "unknown status"),
        ([99, 1], "unknown item kind 99"),
        ([w.QUEUED, 1, "noop"], "expected 8 fields, got 3"),
        (
            [w.TELEMETRY, "h", 1.0, 1, 2, [[0, "G", None, None, None, None, None]], "", 1.0, 0, 0, 0],
            "events[0].gpus[0]: expected 10 fields, got 7",
        ),
        (
            [w.TELEMETRY, "h", 1.0, 1, 2, [[0, "G", None, None, None, None, None, 1, -3, 0]], "", 1.0, 0, 0, 0],
            "events[0].gpus[0].cached_bytes: expected an int >= 0, got -3",
        ),
        (
            [w.TELEMETRY, "h", 1.0, 1, 2, [[0, "G", None, None, None, None, None, 1.5, 3, 0]], "", 1.0, 0, 0, 0],
            "events[0].gpus[0].cached_values: expected int, got float",
        ),
    ],
)
def test_malformed_items_are_refused_naming_the_field(wire: list[Any], named: str) -> None:
    with pytest.raises(ViewerProtocolError, match=re.escape(named)):
        w.decode_items([wire], "events")


def test_data_plane_fields_reach_viewers() -> None:
    """What the job flow and the nodes panel show of dependencies and object stores."""
    queued = pe.TaskQueued(task_id=3, name="vadd", backend="cpu", at=1.0, job="j", waiting_on=(1, 2))
    beat = pe.HostTelemetry(
        host="h",
        cpu_percent=5.0,
        memory_used=1,
        memory_total=2,
        gpus=(),
        gpu_status="",
        at=1.0,
        objects=4,
        object_bytes=1 << 30,
        spilled_bytes=1 << 20,
    )
    assert w.decode_items([w.encode_item(queued), w.encode_item(beat)], "events") == [queued, beat]


def test_gpu_device_caches_reach_viewers() -> None:
    """The bytes a GPU's slots keep on the card, for the nodes panel's GPU rows."""
    cached = pe.GpuReading(
        index=1,
        name="H200",
        utilization=90.0,
        memory_used=40 << 30,
        memory_total=141 << 30,
        temperature=60.0,
        power=500.0,
        cached_values=3,
        cached_bytes=(12 << 30) + 5,
        cache_cap=100 << 30,
    )
    unread = pe.GpuReading(
        index=2, name="H200", utilization=None, memory_used=None, memory_total=None, temperature=None, power=None
    )
    beat = pe.HostTelemetry(
        host="h", cpu_percent=5.0, memory_used=1, memory_total=2, gpus=(cached, unread), gpu_status="", at=1.0
    )
    reader = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
    reader.feed(w.frame(["events", [w.encode_item(beat)]]))  # as the coordinator sends it
    message = reader.next()
    assert message is not None and w.decode_items(message[1], "events") == [beat]


def test_frames_refuse_oversized_and_non_message_payloads() -> None:
    reader = w.FrameReader(w.VIEWER_FRAME_LIMIT)
    reader.feed((w.VIEWER_FRAME_LIMIT + 1).to_bytes(4, "big"))
    with pytest.raises(ViewerProtocolError, match="outside"):
        reader.next()
    reader = w.FrameReader(w.VIEWER_FRAME_LIMIT)
    reader.feed(w.frame([1, 2]))  # a message must start with its tag
    with pytest.raises(ViewerProtocolError, match="starting with its tag"):
        reader.next()
    with pytest.raises(ViewerProtocolError, match="unknown request 'exec'"):
        w.decode_request(["exec", "rm -rf /"])


def test_a_restored_snapshot_shows_what_a_model_open_from_the_start_shows() -> None:
    """10,000+ tasks through the compacting history, restored: every panel's numbers agree."""
    seconds = 40.0
    live = DashboardModel(clock=lambda: T0 + seconds)
    history = ViewerHistory()
    cluster = SyntheticCluster(hosts=6, seed=3)
    batch: list[Any] = []

    def both(event: object) -> None:
        live.apply(event)
        batch.append(w.encode_item(event))  # type: ignore[arg-type]  # replay feeds pool events only

    replay(both, cluster, T0, T0 + seconds, 800)
    history.record(batch)
    assert len(batch) > 3 * RAW_TASK_ITEMS  # most of it was compacted
    restored = DashboardModel(clock=lambda: T0 + seconds)
    frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
    frames.feed(w.frame(["snapshot", history.snapshot()]))  # through the wire, as a viewer gets it
    message = frames.next()
    assert message is not None
    restore(restored, message[1])

    assert restored.totals == live.totals
    assert live.totals.succeeded > 10_000
    for name, job in live.jobs.items():
        other = restored.jobs[name]
        assert (other.submitted, other.running, other.succeeded, other.failed, other.requeued) == (
            job.submitted,
            job.running,
            job.succeeded,
            job.failed,
            job.requeued,
        )
        assert other.meter.series(T0 + seconds) == job.meter.series(T0 + seconds)
    assert restored.throughput.series(T0 + seconds) == live.throughput.series(T0 + seconds)
    for name, host in live.hosts.items():
        other_host = restored.hosts[name]
        assert (other_host.done, other_host.failed, other_host.state) == (host.done, host.failed, host.state)
        for index, gpu in host.gpus.items():
            assert other_host.gpus[index].utilization_history(T0 + seconds) == gpu.utilization_history(T0 + seconds)
    queue, run = live.latency()
    queue2, run2 = restored.latency()
    assert (queue2.counts, run2.counts, run2.total) == (queue.counts, run.counts, run.total)
    assert list(restored.failures) == list(live.failures)
    assert restored.stream(40) == live.stream(40)
    assert set(restored.running) == set(live.running)


def test_a_host_lost_and_not_relaunched_yet_is_not_counted_up() -> None:
    """`batuta ps` counts hosts up from the history: a lost host whose relaunch failed
    (said "lost" again, after the HostDown) was counted up again until it came back."""
    history = ViewerHistory()
    up = pe.HostUp(host="h", slots=("h/0",), gpus=(), cpu_count=1, batuta_version="1", python_version="3", at=1.0)
    history.record([w.encode_item(up)])
    assert history.hosts_up() == ["h"]
    history.record([w.encode_item(pe.HostDown(host="h", reason="killed", at=2.0))])
    assert history.hosts_up() == []
    history.record([w.encode_item(pe.HostStateChanged(host="h", state="lost", reason="refused", at=3.0))])
    assert history.hosts_up() == []
    history.record([w.encode_item(pe.HostStateChanged(host="h", state="up", reason="relaunched", at=4.0))])
    assert history.hosts_up() == ["h"]
    history.record([w.encode_item(pe.HostStateChanged(host="h", state="suspected", reason="quiet", at=5.0))])
    assert history.hosts_up() == ["h"]  # still connected


def test_the_history_stays_bounded_however_long_the_job() -> None:
    from batuta.runtime import serve_history as sh

    history = ViewerHistory()
    cluster = SyntheticCluster(hosts=4, seed=5, failure_rate=0.2)
    batch: list[Any] = []
    replay(lambda event: batch.append(w.encode_item(event)), cluster, T0, T0 + 300, 600)
    history.record(batch)
    assert history.finished > 50_000
    assert len(history.raw) == sh.RAW_TASK_ITEMS
    assert len(history.failures) == sh.FAILURES_KEPT
    assert all(len(beats) <= sh.TELEMETRY_KEPT for beats in history.telemetry.values())
    assert len(history.throughput) <= sh.THROUGHPUT_KEPT_S
    assert all(len(t.meter) <= sh.JOB_METER_KEPT_S for t in history.job_totals.values())
    assert len(history.running) + len(history.running_compacted) < 100  # only what runs now


def test_tasks_labelled_each_their_own_keep_the_history_and_the_dashboard_bounded() -> None:
    """The latency histograms were kept per task name, which is a task's label when it has one:
    `Task.kernel("noop", i, label=f"item-{i}")` grew a served coordinator by 2.3 KiB a task
    (150,000 tasks: 100 -> 387 MiB), a dashboard's model the same, and each attach's snapshot
    with them. Past the first KERNELS_KEPT names they share one "other" histogram."""
    from batuta import Backend, TaskResult, TaskStatus
    from batuta.runtime.events import KERNELS_KEPT, OTHER_KERNEL

    count = RAW_TASK_ITEMS + 2_000
    live = DashboardModel(clock=lambda: T0 + count)
    history = ViewerHistory()
    batch: list[Any] = []
    for task_id in range(1, count + 1):
        at = T0 + task_id * 0.001
        result = TaskResult(
            task_id=task_id,
            name=f"item-{task_id}",
            status=TaskStatus.SUCCEEDED,
            duration=0.002,
            queue_wait=0.001,
            host="h1",
            slot="h1/0",
            attempts=1,
            backend=Backend.CPU,
        )
        for event in (
            pe.TaskQueued(task_id=task_id, name=result.name, backend="cpu", at=at),
            pe.TaskStarted(task_id=task_id, name=result.name, host="h1", slot="h1/0", attempt=1, at=at),
            pe.TaskFinished(result=result, at=at),
        ):
            live.apply(event)
            batch.append(w.encode_item(event))
    history.record(batch)
    assert len(history.latency) == KERNELS_KEPT + 1  # was one a compacted task: 2,000
    assert len(live.latency_choices()["kernel"]) == KERNELS_KEPT + 1  # was one a task: 5,000
    assert OTHER_KERNEL in live.latency_choices()["kernel"]
    restored = DashboardModel(clock=lambda: T0 + count)
    frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
    frames.feed(w.frame(["snapshot", history.snapshot()]))  # through the wire, as a viewer gets it
    message = frames.next()
    assert message is not None
    restore(restored, message[1])
    assert live.latency_choices() == restored.latency_choices()
    assert restored.latency()[1].total == live.latency()[1].total == count


# -- the socket ---------------------------------------------------------------------------------


async def test_the_socket_is_owner_only(runtime_dir: Path) -> None:
    async with served_pool() as (_pool, server):
        mode = stat.S_IMODE(server.path.stat().st_mode)
        folder_mode = stat.S_IMODE(server.path.parent.stat().st_mode)
        assert (mode, folder_mode) == (0o600, 0o700)
        assert server.path.parent == runtime_dir / "batuta"
    assert not server.path.exists()  # removed on close


NOBODY_CONNECTS = """
import os, socket, sys
os.setgid({gid}); os.setuid({uid})
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect({path!r})
except PermissionError:
    print("permission denied"); sys.exit(0)
print("answered:", probe.recv(4096)[4:])  # the coordinator speaks first to a stranger: goodbye
"""


def _as_nobody(path: Path) -> str:
    nobody = pwd.getpwnam("nobody")
    script = NOBODY_CONNECTS.format(uid=nobody.pw_uid, gid=nobody.pw_gid, path=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
async def test_another_user_cannot_connect(runtime_dir: Path) -> None:
    async with served_pool() as (_pool, server):
        assert await asyncio.to_thread(_as_nobody, server.path) == "permission denied"
        # with the folder and socket opened up by mistake, the peer-credential check still refuses
        os.chmod(runtime_dir, 0o755)
        os.chmod(server.path.parent, 0o777)
        os.chmod(server.path, 0o777)
        answer = await asyncio.to_thread(_as_nobody, server.path)
        assert "bye" in answer and f"serves uid {os.getuid()} only" in answer
        assert server.viewers() == []


# -- viewers ------------------------------------------------------------------------------------


async def test_two_viewers_see_every_task_and_a_late_one_sees_the_history(runtime_dir: Path) -> None:
    async with served_pool() as (pool, server):
        first = Viewer(await connect(Target(path=server.path)))
        second = Viewer(await connect(Target(path=server.path)))
        await until(lambda: len(server.viewers()) == 2, "two viewers")
        await run_noops(pool, 400)
        await until(lambda: first.succeeded() == 400 and second.succeeded() == 400, "both viewers to count 400")
        late = Viewer(await connect(Target(path=server.path)))
        await until(lambda: late.snapshots == 1, "the late viewer's snapshot")
        assert late.succeeded() == 400
        assert late.model.jobs["spin"].succeeded == 400
        for viewer in (first, second, late):
            await viewer.close()
        await until(lambda: server.viewers() == [], "the viewers to be forgotten")
        assert server.dropped_items == 0


async def test_a_viewer_that_stops_reading_never_slows_the_coordinator(runtime_dir: Path) -> None:
    async with served_pool(viewer_buffer_bytes=16 * 1024) as (pool, server):
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(str(server.path))
        stuck.sendall(w.frame(["attach", w.VERSION]))  # and then never reads
        reading = Viewer(await connect(Target(path=server.path)))
        await until(lambda: len(server.viewers()) == 2, "both viewers")
        stuck_id = min(s.viewer_id for s in server.viewers())
        await run_noops(pool, 12_000)  # the coordinator finishes every task while one viewer reads nothing
        await until(lambda: reading.succeeded() == 12_000, "the reading viewer to count every task")
        server.flush()
        stuck_stats = next(s for s in server.viewers() if s.viewer_id == stuck_id)
        assert stuck_stats.dropped_items > 0  # counted, not buffered without bound
        # once it reads again it is sent merged state: a fresh snapshot with the right totals
        stuck.setblocking(False)
        caught_up = DashboardModel(clock=time.monotonic)  # folds what the stuck socket receives from now on
        frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 30
        while caught_up.totals.succeeded != 12_000:
            assert time.monotonic() < deadline, "the stuck viewer never caught up"
            frames.feed(await loop.sock_recv(stuck, 1 << 20))
            while (message := frames.next()) is not None:
                if message[0] == "snapshot":
                    restore(caught_up, message[1])
                elif message[0] == "events":
                    apply_items(caught_up, w.decode_items(message[1], "events"))
                    caught_up.drain()
        stuck.close()
        await reading.close()


VIEWER_SCRIPT = """
import asyncio, sys
from batuta.runtime import serve_wire as w
from batuta.runtime.serve_client import Target, connect
from pathlib import Path

async def main():
    connection = await connect(Target(path=Path(sys.argv[1])))
    await connection.send(["attach", w.VERSION])
    while (message := await connection.receive()) is not None:
        if message[0] == "snapshot":
            print("attached", flush=True)

asyncio.run(main())
"""


async def test_a_viewer_killed_with_sigkill_is_forgotten_and_the_job_goes_on(runtime_dir: Path) -> None:
    async with served_pool() as (pool, server):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VIEWER_SCRIPT, str(server.path), stdout=asyncio.subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"attached\n"
            work = asyncio.create_task(run_noops(pool, 2000))
            await until(lambda: server.history.finished > 100, "tasks to run while the viewer watches")
            child.send_signal(signal.SIGKILL)
            await asyncio.wait_for(child.wait(), 30)
            await until(lambda: server.viewers() == [], "the killed viewer to be forgotten")
            await asyncio.wait_for(work, 60)
            server.flush()
            assert server.history.finished == 2000
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()


async def test_controls_from_a_viewer_pause_resume_drain_and_answer_bad_requests(runtime_dir: Path) -> None:
    async with served_pool() as (pool, server):
        connection = await connect(Target(path=server.path))
        await connection.send(["attach", w.VERSION])
        replies: list[list[Any]] = []

        async def read() -> None:
            while (message := await connection.receive()) is not None:
                if message[0] == "reply":
                    replies.append(message)

        reader = asyncio.create_task(read())
        await connection.control("pause")
        await until(lambda: pool.paused, "the pool to pause")
        assert server.info()["paused"] is True  # `batuta ps` says so (it said "running")
        await connection.control("resume")
        await until(lambda: not pool.paused, "the pool to resume")
        assert server.info()["paused"] is False
        await connection.control("drain_host", "no-such-host")
        await connection.control("cancel_job", "spin")
        await connection.control("drain_host", "local")
        await until(lambda: len(replies) == 5, "five replies")
        assert [r[2] for r in replies] == [True, True, False, True, True]
        assert "no host named 'no-such-host'" in replies[2][3]
        await until(lambda: server.history.host_state.get("local", [0, "", ""])[2] == "drained", "the host drained")
        # an attached dashboard undoes a drain too (it could only drain: the last host's work stuck)
        await connection.control("undrain_host", "local")
        await until(lambda: len(replies) == 6, "six replies")
        assert replies[5][2] is True and replies[5][3] == "local takes work again"
        await until(lambda: server.history.host_state.get("local", [0, "", ""])[2] == "up", "the host up again")
        assert server.controls is not None and server.controls.cancelled == ["spin"]  # type: ignore[attr-defined]
        await connection.close()
        reader.cancel()


async def test_a_malformed_request_is_refused_and_the_coordinator_goes_on(runtime_dir: Path) -> None:
    async with served_pool() as (pool, server):
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(w.frame(["control", 1, "format_disk", ""]))
        frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
        frames.feed(await asyncio.wait_for(reader.read(), 30))
        bye = frames.next()
        assert bye is not None and bye[0] == "bye" and "unknown action 'format_disk'" in bye[1]
        writer.close()
        # bytes that are no msgpack at all: named, where the reason was left empty ("FormatError: ")
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(struct.pack(">I", 1) + b"\xc1")
        frames = w.FrameReader(w.COORDINATOR_FRAME_LIMIT)
        frames.feed(await asyncio.wait_for(reader.read(), 30))
        bye = frames.next()
        assert bye is not None and bye == ["bye", "cannot decode frame: FormatError (not msgpack)"]
        writer.close()
        await run_noops(pool, 10)
        info = await ask_info(Target(path=server.path))
        assert (info["state"], info["finished"]) == ("running", 10)


# -- the command line ---------------------------------------------------------------------------


def test_the_runtime_folder_outlives_the_login_and_refuses_one_others_may_enter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not $XDG_RUNTIME_DIR: logind removes it at logout, and a served job went on unreachable."""
    monkeypatch.delenv("BATUTA_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert serve_paths.runtime_dir(create=False) == Path(f"/tmp/batuta-{os.getuid()}")
    opened = tmp_path / "open"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(opened)
    for folder, says in ((opened, "is not a folder that only you can enter"), (link, "is a symbolic link")):
        monkeypatch.setenv("BATUTA_RUNTIME_DIR", str(folder))
        with pytest.raises(UsageError, match=f"^{folder} {says}.*; remove it.* or set BATUTA_RUNTIME_DIR"):
            serve_paths.runtime_dir()


def test_ps_reports_and_removes_a_stale_socket(runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = serve_paths.runtime_dir()
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(folder / "crashed.sock"))  # bound, then its process "died": nothing listens
    crashed.close()
    (folder / "notmine.sock").write_text("a file, not a socket")
    assert cli_main(["ps"]) == 0
    out = capsys.readouterr().out
    assert "crashed" in out and "stale" in out and "the socket was removed" in out
    assert not (folder / "crashed.sock").exists()
    assert (folder / "notmine.sock").exists() and "notmine" not in out  # not a coordinator's: left alone
    assert cli_main(["ps"]) == 0
    assert "no coordinators" in capsys.readouterr().out


def test_stop_and_ps_name_a_coordinator_that_accepts_but_never_answers(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a SIGSTOPped one does (the kernel takes the connection): `batuta stop` ended in a
    TimeoutError traceback after 10 s, and `batuta ps` listed it with an empty reason."""
    from batuta.runtime import serve_client

    monkeypatch.setattr(serve_client, "CONTROL_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(serve_client, "INFO_TIMEOUT_S", 0.5, raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(serve_paths.runtime_dir() / "silent.sock"))
        silent.listen()  # and never accepts: this process is the "coordinator"
        assert cli_main(["stop", "silent"]) == 1  # not a usage error: it is there, and stopped or hung
        err = capsys.readouterr().err.strip()
        assert err == (
            "batuta: error: silent did not answer within 0.5 s; is it stopped or hung? "
            f"'kill -CONT {os.getpid()}' resumes a stopped one (what was asked may still be done when it wakes)"
        )
        assert cli_main(["ps", "--json"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["state"] == "unreachable" and row["summary"].startswith("silent did not answer within 0.5 s")


@pytest.mark.parametrize("kind", ["folder", "regular file"])
def test_stop_on_a_path_that_is_no_socket_says_what_it_is(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """It said "the coordinator of ... is gone (stale socket); 'batuta ps' cleans it up"."""
    path = tmp_path / "somefolder"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text("notes")
    assert cli_main(["stop", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"batuta: error: {path} is a {kind}, not a coordinator's socket; name a coordinator ('batuta ps' lists them)"
    )
    assert path.exists()


def test_tui_serve_without_a_terminal_starts_nothing(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It started the served job, then refused for lack of a terminal, leaving it running."""
    from batuta.cli import _common

    monkeypatch.setattr(_common, "has_terminal", lambda: False)
    try:
        assert cli_main(["tui", "--serve", "-j", "pi", "--name", "noterm", "--workers", "1"]) == 2
        assert "needs a terminal" in capsys.readouterr().err
        assert not serve_paths.socket_path("noterm").exists()
        assert not serve_paths.socket_path("noterm").with_suffix(".log").exists()
    finally:
        if serve_paths.socket_path("noterm").exists():
            cli_main(["stop", "noterm"])


def test_tui_serve_on_a_dumb_terminal_starts_nothing(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batuta.cli import _common, _serve

    monkeypatch.setattr(_common, "has_terminal", lambda: True)
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr(_serve, "_serve_for_tui", lambda args: pytest.fail("the served job must not start"))
    try:
        assert cli_main(["tui", "--serve", "-j", "pi", "--name", "dumbterm", "--workers", "1"]) == 2
        assert "TERM=dumb says this one does not" in capsys.readouterr().err
        assert not serve_paths.socket_path("dumbterm").exists()
    finally:
        if serve_paths.socket_path("dumbterm").exists():
            cli_main(["stop", "dumbterm"])


def test_tui_serve_with_a_name_taken_says_so_once_and_exits_2(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `batuta run --serve` does; it added "the served coordinator pi did not start" and exited 1."""
    from batuta.cli import _common

    monkeypatch.setattr(_common, "has_terminal", lambda: True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as taken:
        taken.bind(str(serve_paths.runtime_dir() / "taken.sock"))
        taken.listen()  # a running coordinator, as far as the start can tell
        assert cli_main(["tui", "--serve", "-j", "pi", "--name", "taken", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batuta: error: a coordinator named 'taken' is already running") and "\n" not in err


JOB = """\
from batuta import Task


async def main(pool):
    for round in range(100_000):
        await pool.map("noop", range(20))
"""


@contextlib.contextmanager
def served_forever(job: Path, *, workers: int, stdout: int) -> Iterator[subprocess.Popen[str]]:
    """`batuta run job --serve --foreground --name forever`, `job` holding JOB (it never ends),
    once it serves; killed afterwards if it still runs."""
    job.write_text(JOB)
    command = [sys.executable, "-m", "batuta", "run", str(job), "--serve", "--foreground", "--name", "forever"]
    child = subprocess.Popen([*command, "--workers", str(workers)], stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        assert "forever.py as forever on" in child.stderr.readline()
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("how", ["batuta stop", "SIGTERM", "SIGHUP"])
def test_a_served_run_is_listed_by_ps_and_ended_cleanly(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    job = tmp_path / "forever.py"
    with served_forever(job, workers=2, stdout=subprocess.PIPE) as child:
        deadline = time.monotonic() + 60
        while asyncio.run(ask_info(parse_target("forever")))["finished"] == 0:  # until tasks run
            assert time.monotonic() < deadline, "no task finished"
        assert cli_main(["ps"]) == 0
        out = capsys.readouterr().out
        assert "forever" in out and "running" in out and "1/1" in out
        log = serve_paths.socket_path("forever").with_suffix(".log")
        log.write_text("the running coordinator's log\n")
        assert cli_main(["run", str(job), "--serve", "--name", "forever"]) == 2  # the name is taken
        assert "a coordinator named 'forever' is already running" in capsys.readouterr().err
        assert log.read_text() == "the running coordinator's log\n"  # not wiped by the refused start
        if how.startswith("SIG"):  # SIGHUP: --foreground in a terminal that closed; it ended with no summary
            child.send_signal(getattr(signal, how))
        else:
            assert cli_main(["stop", "forever"]) == 0
            assert "forever stopped" in capsys.readouterr().out
        assert child.wait(timeout=60) == 130  # the run was interrupted: its tasks were cancelled
        assert child.stdout is not None and child.stderr is not None
        summary = child.stdout.read()  # as `batuta run` prints it
        assert re.search(r"tasks: \d+ succeeded, 0 failed", summary), summary[-600:]  # a cancelled count if some ran
        assert "interrupted: " in child.stderr.read()
        assert not serve_paths.socket_path("forever").exists()


def test_a_start_that_loses_its_picked_name_to_another_takes_the_next_and_wipes_no_log(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `batuta run dup.py --serve` at once: both saw `dup` free, the loser's child found it
    taken, exited 2, and its log file, opened with O_TRUNC, wiped the winner's log."""
    job = tmp_path / "forever.py"
    with served_forever(job, workers=1, stdout=subprocess.DEVNULL):
        log = serve_paths.socket_path("forever").with_suffix(".log")
        log.write_text("the running coordinator's log\n")
        real_is_stale, looks = serve_paths.is_stale, iter([True, True])  # the first looks find `forever` free,
        monkeypatch.setattr(
            serve_paths, "is_stale", lambda path: next(looks, None) or real_is_stale(path)
        )  # as in a race
        assert cli_main(["run", str(job), "--serve", "--workers", "1"]) == 0  # no --name: one is picked
        out = capsys.readouterr().out
        assert "as forever-2 (pid" in out, out
        assert log.read_text().startswith("the running coordinator's log\n")  # appended to, not wiped
        assert cli_main(["stop", "forever-2"]) == 0


VALUE_JOB = """\
async def main(pool):
    print("the job's own output")
    return "the value"
"""


@pytest.mark.parametrize("flags", [[], ["--json"], ["--quiet"]], ids=["text", "json", "quiet"])
def test_a_served_run_reports_as_batuta_run_does(runtime_dir: Path, tmp_path: Path, flags: list[str]) -> None:
    """--json, --quiet (and --strict, --metrics-linger) reach a served run: before, it printed
    its text summary on stderr whatever was asked."""
    job = tmp_path / "done.py"
    job.write_text(VALUE_JOB)
    command = [sys.executable, "-m", "batuta", "run", str(job), "--serve", "--foreground", "--serve-linger", "0"]
    done = subprocess.run([*command, "--workers", "1", *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if flags == ["--json"]:
        summary = json.loads(done.stdout)  # stdout is the summary's JSON alone
        assert summary["result"] == "the value" and summary["ok"] is True
        assert "the job's own output" in done.stderr
        return
    lines = done.stdout.splitlines()
    assert "the job's own output" in lines and "the value" in lines
    assert any(re.search(r"tasks?: \d+ succeeded", line) for line in lines) is (flags == [])  # the summary


def test_a_served_run_leaves_its_failed_tasks_to_the_summary_as_batuta_run_does(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """Each failed task was also a warning on its console, where `batuta run` says each cause once."""
    job = tmp_path / "fails.py"
    job.write_text(
        "from batuta import Task\n\n\nasync def main(pool):\n"
        "    futures = [await pool.submit(Task.kernel('nope', float(i))) for i in range(5)]\n"
        "    return sum([(await f).is_success() for f in futures])\n"
    )
    command = [sys.executable, "-m", "batuta", "run", str(job), "--serve", "--foreground", "--serve-linger", "0"]
    done = subprocess.run([*command, "--workers", "1", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "WARNING batuta.pool" not in done.stderr, done.stderr
    assert "batuta: 5 tasks failed: UnknownKernelError: unknown kernel 'nope'" in done.stderr


def test_a_served_runs_value_and_summary_come_out_when_the_job_ends_not_when_the_linger_does(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In the background they go to its log: they reached it only when the coordinator exited,
    `batuta stop` or ten minutes of linger after the job had ended."""
    job = tmp_path / "done.py"
    job.write_text(VALUE_JOB)
    command = [sys.executable, "-m", "batuta", "run", str(job), "--serve", "--foreground", "--name", "done"]
    child = subprocess.Popen([*command, "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert child.stdout is not None
        out = b""
        deadline = time.monotonic() + 60
        while not re.search(rb"tasks?: \d+ succeeded", out) and time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], deadline - time.monotonic())
            if ready:
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        assert b"the value\n" in out and re.search(rb"tasks?: \d+ succeeded", out), out
        assert child.poll() is None  # still lingering, for `batuta ps` and a late attach
        assert asyncio.run(ask_info(parse_target("done")))["state"] == "done"
        assert cli_main(["stop", "done"]) == 0
        # it said "its tasks are cancelled and its hosts released" of a job long over
        assert "batuta: stopping done: its job had ended (done); it lingered for ps only" in capsys.readouterr().out
        assert child.wait(timeout=60) == 0
        whole = out + child.stdout.read()  # the rest of the summary, if it was still on its way
        assert whole.count(b"the value\n") == 1 and len(re.findall(rb"tasks?: \d+ succeeded", whole)) == 1, whole
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("where", ["background", "foreground"])
def test_a_served_run_whose_hosts_cannot_start_says_so_and_exits_3_as_batuta_run_does(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """In the background it said 'serving job pi as ...' and exited 0, then vanished (only its
    log said why); in the foreground it exited 1, not batuta run's 3."""
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[local]\nslots = 1\npython = "/bin/false"\n')
    argv = ["run", "pi", "-c", str(cluster), "--serve", "--name", "nohost"]
    if where == "background":
        assert cli_main(argv) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("batuta: error: the served coordinator exited at start (3): no host could be started")
        return
    done = subprocess.run(
        [sys.executable, "-m", "batuta", *argv, "--foreground"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.splitlines()[-1].startswith("batuta: error: no host could be started, so nothing ran")


def test_a_background_served_run_passes_every_run_option_on(runtime_dir: Path, tmp_path: Path) -> None:
    from batuta.cli import build_parser
    from batuta.cli._serve import _child_argv

    argv = ["run", "demo", "--serve", "--strict", "--json", "--quiet", "--metrics-linger", "5", "--resume"]
    argv += ["--journal", str(tmp_path)]
    child = _child_argv(build_parser().parse_args(argv), "demo")
    for flag in ("--strict", "--json", "--quiet", "--resume", "--foreground"):
        assert flag in child
    assert child[child.index("--metrics-linger") + 1] == "5.0"


def test_a_background_served_run_stopped_says_to_resume_it_in_the_background(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its note said '... --serve --name resumable --foreground ... --resume': the --foreground
    of the spawned coordinator's own command line, which the user never gave, so the resumed
    run held the terminal."""
    job = tmp_path / "forever.py"
    job.write_text(JOB)
    journal = tmp_path / "journal"
    argv = ["run", str(job), "--serve", "--name", "resumable", "--workers", "1", "--journal", str(journal)]
    assert cli_main(argv) == 0
    assert cli_main(["stop", "resumable"]) == 0  # returns once the coordinator has ended
    capsys.readouterr()
    log = (runtime_dir / "batuta" / "resumable.log").read_text()
    [note] = [line for line in log.splitlines() if line.startswith("batuta: interrupted: ")]
    again = ["batuta", "run", str(job), "--serve", "--name", "resumable", "--workers", "1"]
    assert note.endswith(
        f"to run only what is not done: {shlex.join(again)} --journal {shlex.quote(str(journal))} --resume"
    )


def test_a_background_served_run_with_serve_bind_says_its_tls_address(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batuta.transport.certs import init_certs

    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    job = tmp_path / "forever.py"
    job.write_text(JOB)
    argv = ["run", str(job), "--serve", "--name", "tlsserved", "--workers", "1"]
    assert cli_main([*argv, "--serve-bind", "127.0.0.1:0", "--serve-certs", str(paths.directory)]) == 0
    try:
        out = capsys.readouterr().out
        [port] = re.findall(r"'batuta tui --attach tls://127\.0\.0\.1:(\d+) --certs DIR'", out)  # port 0: the real one
        assert int(port) > 0 and asyncio.run(ask_info(parse_target("tlsserved")))["tls"] == f"127.0.0.1:{port}"
        # stopped over TLS, it waits for the coordinator's end, as a stop by name does (it said "stopping")
        assert cli_main(["stop", f"tls://127.0.0.1:{port}", "--certs", str(paths.directory)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"batuta: tls://127.0.0.1:{port} stopped"
        with pytest.raises(ServeError):
            asyncio.run(ask_info(parse_target("tlsserved")))
    finally:
        left = parse_target("tlsserved").path
        if left is not None and left.exists():
            cli_main(["stop", "tlsserved"])


@pytest.mark.parametrize("how", ["hung-up", "hung-up-and-sighup"])
def test_a_viewer_ends_when_its_terminal_goes_away_and_the_job_goes_on(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """A viewer whose tmux was killed was seen spinning at 50-93% CPU: its terminal gone,
    Textual's input thread read EOF at full speed and its writer thread died on EIO, blocking
    the app's next write; the SIGHUP that followed, raised as KeyboardInterrupt in that blocked
    loop, changed nothing. Now it detaches with exit 130, as a hung-up command does, with or
    without the SIGHUP; the coordinator runs on."""
    from tests.support.terminal import Terminal

    job = tmp_path / "forever.py"
    job.write_text(JOB)
    assert cli_main(["run", str(job), "--serve", "--name", "hungview", "--workers", "1"]) == 0
    capsys.readouterr()
    terminal = Terminal()
    try:
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        slave = terminal.slave
        viewer = subprocess.Popen(
            [sys.executable, "-m", "batuta", "tui", "--attach", "hungview"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        try:
            for _ in range(600):  # bounded: 60 s for the dashboard to name the coordinator
                if viewer.poll() is not None or b"hungview" in terminal.output():
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    viewer.wait(0.1)
            assert viewer.poll() is None, terminal.output()[-2000:]
            terminal.hang_up()
            if how == "hung-up-and-sighup":  # as the kernel does to a terminal's foreground processes
                viewer.send_signal(signal.SIGHUP)
            assert viewer.wait(60) == 130
        finally:
            if viewer.poll() is None:
                viewer.kill()
                viewer.wait()
        assert asyncio.run(ask_info(parse_target("hungview")))["state"] == "running"
    finally:
        terminal.close()
        cli_main(["stop", "hungview"])


def test_a_viewer_with_another_cas_certificate_is_told_in_one_line_not_a_dashboard(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal, 'batuta tui --attach tls://... --certs WRONG' opened the whole dashboard,
    empty, offering its demo ('press d'), with the error in a toast; it said the line and
    exited 1 only when quit. A name with no socket was already one line, exit 2."""
    from batuta.transport.certs import init_certs
    from tests.support.terminal import read_pty

    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    other = init_certs(tmp_path / "other", hosts=["127.0.0.1"])  # another CA
    job = tmp_path / "forever.py"
    job.write_text(JOB)
    argv = ["run", str(job), "--serve", "--name", "tlsviewed", "--workers", "1"]
    assert cli_main([*argv, "--serve-bind", "127.0.0.1:0", "--serve-certs", str(paths.directory)]) == 0
    try:
        [port] = re.findall(r"tls://127\.0\.0\.1:(\d+) --certs DIR", capsys.readouterr().out)
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        command = [sys.executable, "-m", "batuta", "tui", "--attach", f"tls://127.0.0.1:{port}"]
        with read_pty() as (slave, chunks):
            viewer = subprocess.Popen(
                [*command, "--certs", str(other.directory)], stdin=slave, stdout=slave, stderr=slave, env=env
            )
            try:
                for _ in range(600):  # bounded: 60 s for it to end, or to open a dashboard
                    if viewer.poll() is not None or b"\x1b[?1049h" in b"".join(chunks):
                        break
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        viewer.wait(0.1)
                opened = b"\x1b[?1049h" in b"".join(chunks)  # the alternate screen: a dashboard
            finally:
                if viewer.poll() is None:
                    viewer.kill()
                viewer.wait(30)
        said = b"".join(chunks).decode(errors="replace").strip()
        assert not opened and viewer.returncode == 2, said[-2000:]
        assert said.startswith(f"batuta: error: cannot connect to tls://127.0.0.1:{port}: ") and "ca.pem" in said
        assert len(said.splitlines()) == 1
    finally:
        cli_main(["stop", "tlsviewed"])


def test_a_background_served_run_says_where_a_picked_metrics_port_is(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --metrics-port 0 the port picked was written only to NAME.log."""
    import urllib.request

    job = tmp_path / "forever.py"
    job.write_text(JOB)
    argv = ["run", str(job), "--serve", "--name", "metered", "--workers", "1", "--metrics-port", "0"]
    assert cli_main(argv) == 0
    try:
        out = capsys.readouterr().out
        [url] = re.findall(r"^batuta: its metrics: (http://127\.0\.0\.1:\d+/metrics)$", out, re.MULTILINE)
        assert asyncio.run(ask_info(parse_target("metered")))["metrics"] == url
        with urllib.request.urlopen(url, timeout=10) as scrape:  # loopback: the served job's own exporter
            assert b"batuta_tasks_submitted_total" in scrape.read()
    finally:
        assert cli_main(["stop", "metered"]) == 0


def test_a_served_job_that_ended_names_no_metrics_url_once_its_exporter_stopped(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exporter stops with the job, but the coordinator lingers for `batuta ps`, whose
    --json still gave its metrics URL: a scraper pointed there met a refused connection."""
    gate = tmp_path / "gate"
    job = tmp_path / "short.py"
    job.write_text(  # it ends once the test has read the URL (a job done first has none to print)
        "import asyncio, pathlib\n"
        "async def main(pool):\n"
        "    for _ in range(6000):\n"
        f"        if pathlib.Path({str(gate)!r}).exists():\n"
        "            break\n"
        "        await asyncio.sleep(0.01)\n"
        '    return sum(await pool.map("noop", range(4)))\n'
    )
    argv = ["run", str(job), "--serve", "--name", "ended", "--workers", "1", "--metrics-port", "0"]
    assert cli_main(argv) == 0
    try:
        [url] = re.findall(r"^batuta: its metrics: (http://\S+)$", capsys.readouterr().out, re.MULTILINE)
        gate.touch()
        info: dict[str, Any] = {}
        for _ in range(600):  # bounded: 60 s for the job's end
            info = asyncio.run(ask_info(parse_target("ended")))
            if info["state"] != "running" and info["state"] != "starting":
                break
            time.sleep(0.1)  # another process's state: nothing to wait on but asking again
        assert info["state"] == "done" and url
        assert info["metrics"] == ""
    finally:
        assert cli_main(["stop", "ended"]) == 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_served_coordinator_whose_log_disk_is_full_runs_its_job_to_the_end(runtime_dir: Path) -> None:
    """Its stdout and stderr are its NAME.log: on a full disk the summary's print raised, and
    the coordinator exited 1 at once, its job's end said nowhere. (/dev/full: ENOSPC always.)"""
    command = [sys.executable, "-m", "batuta", "run", "pi", "--serve", "--foreground", "--name", "fullx"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*command, "--workers", "1", "--serve-linger", "0"], stdout=full, stderr=full, timeout=120, check=False
        )
    assert done.returncode == 0


def test_a_served_run_whose_log_cannot_be_written_says_so_in_a_line(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a traceback from os.write (a full disk), and an empty NAME.log left behind. The
    fix follows the errno: a folder in the log's place said "free space there", which frees
    nothing (the agent's cache says the same way)."""
    log = serve_paths.socket_path("blocked").with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log.mkdir()  # a log that cannot be opened, though the disk has room
    assert cli_main(["run", "pi", "--serve", "--name", "blocked", "--workers", "1"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"batuta: error: cannot open blocked's log {log}: Is a directory; move aside what is in the way "
        "(a folder where a file goes, or a file where a folder goes), or set BATUTA_RUNTIME_DIR to a folder with room"
    )
    if not Path("/dev/full").exists():
        return
    full = serve_paths.socket_path("full").with_suffix(".log")
    full.symlink_to("/dev/full")  # opens, then every write fails with ENOSPC: a full disk
    assert cli_main(["run", "pi", "--serve", "--name", "full", "--workers", "1"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"batuta: error: cannot write full's log {full}: No space left on device; free space there, or set "
        "BATUTA_RUNTIME_DIR to a folder with room"
    )


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_served_run_on_ipv6_says_a_tls_address_that_parses_back(
    runtime_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said tls://::1:PORT, which `--attach` then refused."""
    from batuta.transport.certs import init_certs

    paths = init_certs(tmp_path / "certs", hosts=["::1"])
    job = tmp_path / "forever.py"
    job.write_text(JOB)
    argv = ["run", str(job), "--serve", "--name", "v6served", "--workers", "1"]
    assert cli_main([*argv, "--serve-bind", "[::1]:0", "--serve-certs", str(paths.directory)]) == 0
    try:
        out = capsys.readouterr().out
        [address] = re.findall(r"'batuta tui --attach (tls://\S+) --certs DIR'", out)
        target = parse_target(address)
        assert target.tls is not None and target.tls[0] == "::1" and target.tls[1] > 0
        viewer_sees = asyncio.run(ask_info(target, certs=paths.directory))
        assert viewer_sees["name"] == "v6served"
    finally:
        assert cli_main(["stop", "v6served"]) == 0


def test_tui_serve_starts_a_served_coordinator_for_its_job(runtime_dir: Path, tmp_path: Path) -> None:
    from batuta.cli import build_parser
    from batuta.cli._serve import _serve_for_tui

    job = tmp_path / "forever.py"
    job.write_text(JOB)
    argv = ["tui", "--serve", "-j", str(job), "--workers", "1", "--name", "viatui", "--backend", "scalar"]
    args = build_parser().parse_args(argv)
    assert _serve_for_tui(args) == "viatui"  # then the dashboard attaches to it (needs a terminal)
    try:
        info = asyncio.run(ask_info(parse_target("viatui")))
        assert info["job"] == str(job)
        command = psutil.Process(info["pid"]).cmdline()  # the served coordinator runs apart from this process
        assert command[command.index("--backend") + 1] == "scalar"  # the job's backend, as `run` gives it
    finally:
        assert cli_main(["stop", "viatui"]) == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["stop", "nobody-here"], "no coordinator at"),
        (["tui", "--attach", "nobody-here"], "no coordinator at"),  # it opened a dashboard to say so
        (["stop", "me@gpu1:"], "write user@host:NAME"),
        (["stop", "tls://127.0.0.1:9"], "tls://127.0.0.1:9 needs --certs DIR"),  # said "--attach ... needs"
        (["tui", "--attach", "tls://127.0.0.1:9"], "tls://127.0.0.1:9 needs --certs DIR"),  # "attaching..." for ever
        (["tui", "--attach", "tls://127.0.0.1:9", "--certs", "/nonexistent"], "--certs /nonexistent: no such folder"),
        (["tui", "--attach", "x", "--cluster", "c.toml"], "--cluster only lends its [ssh] settings"),
        (["stop", "x", "--cluster", "c.toml"], "--cluster only lends its [ssh] settings to user@host:NAME, not "),
        (["tui", "--attach", "x", "-j", "demo"], "drop --workers/-j/--module"),
        (["tui", "--serve"], "pass exactly one -j JOB"),
        (["tui", "--name", "x"], "--name is for --serve"),
        (["tui", "--name", ""], "--name is for --serve"),
        (["run", "demo", "--name", "x"], "--name only applies to a served run; add --serve"),
        (["run", "demo", "--serve", "--serve-bind", "127.0.0.1:0"], "--serve-bind needs --serve-certs DIR"),
        (  # said "--serve-certs DIR: batuta worker: CA certificate ..."
            ["run", "demo", "--serve", "--serve-bind", "127.0.0.1:0", "--serve-certs", "/nonexistent"],
            "error: --serve-certs /nonexistent: CA certificate /nonexistent/ca.pem: no such file; create one with",
        ),
        (["run", "demo", "--serve", "--name", "a/b"], "coordinator name 'a/b' is not usable"),
        (["run", "demo", "--serve-linger", "5"], "--serve-linger only applies to a served run; add --serve"),
        (["run", "demo", "--serve", "--name", ""], "coordinator name '' is not usable"),  # served as demo-2
        (  # took 9443, a worker's port
            ["run", "demo", "--serve", "--serve-bind", "127.0.0.1", "--serve-certs", "/nonexistent"],
            "error: --serve-bind 127.0.0.1: '127.0.0.1' has no port; write HOST:PORT",
        ),
        (  # reached the worker on 9443: "a message must be an array starting with its tag"
            ["stop", "tls://127.0.0.1", "--certs", "/nonexistent"],
            "error: batuta stop tls://127.0.0.1: '127.0.0.1' has no port; write HOST:PORT",
        ),
        (  # said "--attach ...: ... e.g. [::1:9482]:9443"
            ["stop", "tls://::1:9482"],
            "error: batuta stop tls://::1:9482: '::1:9482': write an IPv6 address in brackets, e.g. [::1]:9482 ",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(
    runtime_dir: Path, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_stop_at_a_tls_address_where_nothing_listens_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It gave asyncio's own words: "Connect call failed ('127.0.0.1', 9)"."""
    from batuta.transport.certs import init_certs

    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    with socket.socket() as unused:  # a port nothing listens on: bound, never listening
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert cli_main(["stop", f"tls://127.0.0.1:{port}", "--certs", str(paths.directory)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"batuta: error: cannot connect to tls://127.0.0.1:{port}: nothing listens there"), err
    assert "Connect call failed" not in err


def test_attach_targets_parse() -> None:
    assert parse_target("tls://[::1]:9482").tls == ("::1", 9482)
    assert parse_target("tls://[::1]:9482").label == "tls://[::1]:9482"  # was tls://::1:9482, which does not parse
    assert parse_target("me@gpu1:train").ssh_host == "gpu1"
    assert parse_target("me@gpu1:train").remote == "train"
    assert parse_target("gpu1:/run/user/1000/batuta/x.sock").remote == "/run/user/1000/batuta/x.sock"
    assert parse_target("tls://10.0.0.5:9470").tls == ("10.0.0.5", 9470)
    assert parse_target("./x.sock").path == Path("x.sock")
    with pytest.raises(UsageError, match="not usable"):
        parse_target("me@gpu1:bad*name")


def test_a_served_job_that_raised_says_why_in_ps(runtime_dir: Path, tmp_path: Path) -> None:
    """`batuta ps` showed 'failed' beside '50 tasks: 50 succeeded, 0 failed': the reason was in the log only."""
    from batuta.jobs import load_job, serve_job

    (tmp_path / "raising.py").write_text(
        "async def main(pool):\n    await pool.map('noop', range(5))\n    raise RuntimeError('boom at the end')\n"
    )
    job = load_job(str(tmp_path / "raising.py"))
    seen: list[dict[str, Any]] = []

    async def main() -> None:
        def listening(server: CoordinatorServer) -> None:
            async def watch() -> None:
                await until(lambda: server.state == "failed", "the job to fail", timeout=120)
                seen.append(await ask_info(Target(path=server.path)))

            asyncio.get_running_loop().create_task(watch())

        await serve_job(job, name="raising", linger_s=0.5, on_listening=listening, workers=1)

    asyncio.run(main())
    assert seen and seen[0]["state"] == "failed"
    summary = seen[0]["summary"]
    assert summary.startswith("5 tasks: 5 succeeded, 0 failed") and "RuntimeError: boom at the end" in summary, summary


def test_serve_job_keeps_a_finished_coordinator_visible_then_exits(runtime_dir: Path) -> None:
    from batuta.jobs import load_job, serve_job

    job = load_job("demo")
    seen: list[dict[str, Any]] = []

    async def main() -> None:
        def listening(server: CoordinatorServer) -> None:
            async def watch() -> None:
                await until(lambda: server.state == "done", "the job to finish", timeout=120)
                seen.append(await ask_info(Target(path=server.path)))

            asyncio.get_running_loop().create_task(watch())

        outcome = await serve_job(job, name="lingering", linger_s=0.5, on_listening=listening, workers=2)
        assert outcome is not None and outcome.summary.ok

    asyncio.run(main())
    assert seen and seen[0]["state"] == "done" and "succeeded" in seen[0]["summary"]
    assert (seen[0]["hosts"], seen[0]["hosts_up"]) == (1, 0)  # released with the pool: not counted up (was 1/1)
    assert not serve_paths.socket_path("lingering").exists()  # it exited after its linger


async def test_a_viewer_attaches_over_ssh_by_name_with_the_clusters_host_key_rules(
    runtime_dir: Path, ssh_hosts: Any
) -> None:
    from batuta.transport.ssh import SSHSettings

    hosts = ssh_hosts(
        1, env={"BATUTA_RUNTIME_DIR": str(runtime_dir / "batuta")}
    )  # the remote shell finds the same folder
    settings = SSHSettings(config_files=(hosts.ssh_config,), known_hosts=hosts.known_hosts)
    async with served_pool() as (pool, server):
        viewer = Viewer(await connect(parse_target(f"{hosts[0].name}:t"), ssh=settings))
        await until(lambda: viewer.snapshots == 1, "the snapshot over SSH")
        await run_noops(pool, 300)
        await until(lambda: viewer.succeeded() == 300, "every task over SSH")
        await viewer.close()
        await until(lambda: server.viewers() == [], "the SSH viewer to be forgotten")
        # an unknown host key is refused, as for the cluster's hosts
        empty = runtime_dir / "known_hosts"
        empty.write_text("")
        strict = SSHSettings(config_files=(hosts.ssh_config,), known_hosts=empty)
        with pytest.raises(ServeError, match="cannot reach"):
            await connect(parse_target(f"{hosts[0].name}:t"), ssh=strict)
        # batuta stop takes the cluster file's [ssh] settings too (it had no --cluster), and
        # reaches a host it names as the cluster does (its address, here an alias of the config)
        cluster = runtime_dir / "cluster.toml"
        ssh = f'[ssh]\nconfig = "{hosts.ssh_config}"\nknown_hosts = "{hosts.known_hosts}"\n'
        cluster.write_text(f'{ssh}[[hosts]]\nname = "trainbox"\naddress = "{hosts[0].name}"\n')
        assert isinstance(server.controls, _Stop)
        ending: list[asyncio.Task[None]] = []  # it waits for the coordinator's end: this one ends when told
        server.controls.on_stop = lambda: ending.append(asyncio.get_running_loop().create_task(server.close()))
        assert await asyncio.to_thread(cli_main, ["stop", "trainbox:t", "-c", str(cluster)]) == 0
        assert isinstance(server.controls, _Stop) and server.controls.stopped


async def test_serve_bind_takes_mutual_tls_only(runtime_dir: Path, tmp_path: Path) -> None:
    import ssl

    from batuta.transport.certs import init_certs
    from batuta.transport.tls import server_context

    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    context = server_context(cert=paths.server_cert, key=paths.server_key, ca=paths.ca_cert)
    async with served_pool(tls_bind=("127.0.0.1", 0), tls_context=context) as (pool, server):
        assert server.tls_address is not None
        host, port = server.tls_address
        viewer = Viewer(await connect(parse_target(f"tls://{host}:{port}"), certs=paths.directory))
        await until(lambda: viewer.snapshots == 1, "the snapshot over TLS")
        await run_noops(pool, 100)
        await until(lambda: viewer.succeeded() == 100, "every task over TLS")
        await viewer.close()
        # a client without a certificate gets no further than the handshake
        anonymous = ssl.create_default_context(cafile=str(paths.ca_cert))
        reader, writer = await asyncio.open_connection(host, port, ssl=anonymous)
        writer.write(w.frame(["info"]))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data = await asyncio.wait_for(reader.read(), 30)
            if not data:
                raise ConnectionResetError("closed without an answer")
        writer.close()


async def test_a_client_certificate_of_another_ca_is_one_line_naming_it_not_a_traceback(
    runtime_dir: Path, tmp_path: Path
) -> None:
    """Under TLS 1.3 the refusal comes after the client's handshake: `batuta stop` died of
    ConnectionResetError half the time, and said "did not answer 'stop'" the other half."""
    import shutil as sh

    from batuta.transport.certs import init_certs
    from batuta.transport.tls import server_context

    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    other = init_certs(tmp_path / "other", hosts=["127.0.0.1"])  # another cluster's CA
    mixed = tmp_path / "mixed"
    mixed.mkdir(mode=0o700)
    sh.copy(other.client_cert, mixed / "client.pem")
    sh.copy(other.client_key, mixed / "client.key")
    sh.copy(paths.ca_cert, mixed / "ca.pem")  # the coordinator's own is trusted: the handshake completes
    context = server_context(cert=paths.server_cert, key=paths.server_key, ca=paths.ca_cert)
    async with served_pool(tls_bind=("127.0.0.1", 0), tls_context=context) as (_, server):
        assert server.tls_address is not None
        host, port = server.tls_address
        for _ in range(4):  # the race: the refusal may reach the write or the read first
            with pytest.raises(ServeError) as refused:
                connection = await connect(parse_target(f"tls://{host}:{port}"), certs=mixed)
                try:
                    await connection.send(["info"])
                    await connection.receive()
                finally:
                    await connection.close()
            assert "most likely it refused this client's certificate" in str(refused.value), refused.value


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
async def test_a_coordinator_certificate_that_does_not_name_its_address_is_one_line_with_the_fix(
    runtime_dir: Path, tmp_path: Path, tls12: bool
) -> None:
    """As `batuta run` says it of a worker: not OpenSSL's "[SSL: CERTIFICATE_VERIFY_FAILED] ...
    (_ssl.c:1006)", and with the names the certificate holds (it listed none); under TLS 1.2,
    where they cannot be read, how to list them there."""
    import ssl

    from batuta.transport.certs import init_certs
    from batuta.transport.tls import server_context

    paths = init_certs(tmp_path / "certs", hosts=["gpu2.lan"])  # not the address dialled
    context = server_context(cert=paths.server_cert, key=paths.server_key, ca=paths.ca_cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with served_pool(tls_bind=("127.0.0.1", 0), tls_context=context) as (_, server):
        assert server.tls_address is not None
        host, port = server.tls_address
        with pytest.raises(ServeError) as refused:
            await connect(parse_target(f"tls://{host}:{port}"), certs=paths.directory)
    message = str(refused.value)
    assert message.startswith(
        f"cannot connect to tls://127.0.0.1:{port}: the coordinator's certificate is not acceptable"
    )
    if tls12:
        assert (
            "its certificate does not name '127.0.0.1', and which names it holds could not be read from here (they "
            "cannot be under TLS 1.2): on the coordinator's machine, `openssl x509 -noout -ext subjectAltName -in` "
            "the server.pem of its --serve-certs DIR lists them; dial one of those, or reissue the coordinator's "
            "certificate with `batuta certs reissue DIR --host 127.0.0.1` and a --host for each name to keep"
        ) in message
    else:
        assert (
            "it names gpu2.lan, not 127.0.0.1, the address dialled: dial one of those, or reissue the coordinator's "
            "certificate with `batuta certs reissue DIR --host gpu2.lan --host 127.0.0.1`"
        ) in message
    assert "_ssl.c" not in message and "\n" not in message


def test_a_host_named_in_the_cluster_file_is_reached_by_its_ssh_entry_only(tmp_path: Path) -> None:
    """`stop gpu1:NAME -c FILE` dials gpu1 as the file's [[hosts]] entry says (address, port,
    user, key); a TLS worker's entry says where its listener is, not sshd: not used for SSH."""
    from batuta.cli._serve import _lent_ssh

    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        '[[hosts]]\nname = "gpu1"\naddress = "10.9.9.1"\nport = 2222\nuser = "alice"\n\n'
        '[[hosts]]\nname = "w1"\naddress = "10.9.9.2"\nport = 9443\ntransport = "tls"\n\n'
        '[tls]\nca = "ca.pem"\ncert = "client.pem"\nkey = "client.key"\n'
    )
    target, settings = _lent_ssh(parse_target("gpu1:run"), str(cluster), ask_passphrase=False)
    assert target.ssh_via is not None and settings is not None
    assert (target.ssh_via.host, target.ssh_via.port, target.ssh_via.user) == ("10.9.9.1", 2222, "alice")
    given, _ = _lent_ssh(parse_target("bob@gpu1:run"), str(cluster), ask_passphrase=False)
    assert given.ssh_via is not None and given.ssh_via.user == "bob"  # the target's user@ wins
    worker, _ = _lent_ssh(parse_target("w1:run"), str(cluster), ask_passphrase=False)
    assert worker.ssh_via is None


def test_a_served_job_whose_pool_still_starts_is_starting_in_ps_until_its_main_runs(
    runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up waits for a second host (start_wait; a bootstrap install waits so too): `batuta
    ps` said "running", 0/0 tasks, at the first host up, and `batuta stop` then said the job was
    stopped before it started."""
    import math

    from batuta.jobs import _run, load_job, serve_job
    from batuta.runtime.builder import PoolConfig, local_host
    from batuta.runtime.serve_client import ask_control

    silent = tmp_path / "silent-python"  # an agent that never says hello: a host still starting
    silent.write_text("#!/bin/sh\nexec sleep 600\n")
    silent.chmod(0o755)
    hosts = [local_host(1, gpus="none"), local_host(1, gpus="none", python=str(silent), name="slow")]
    monkeypatch.setattr(_run, "make_pool", lambda **_: Pool(hosts, PoolConfig(start_wait=math.inf, start_timeout=600)))
    job = load_job("demo")
    seen: list[dict[str, Any]] = []

    async def main() -> object:
        def listening(server: CoordinatorServer) -> None:
            async def watch() -> None:
                await until(lambda: server.history.hosts_up() == ["local"], "the first host up", timeout=120)
                seen.append(await ask_info(Target(path=server.path)))
                seen.append({"stop": await ask_control(Target(path=server.path), "stop")})

            asyncio.get_running_loop().create_task(watch())

        return await serve_job(job, name="waiting", linger_s=0.5, on_listening=listening)

    assert asyncio.run(main()) is None  # stopped before its job started, as `batuta stop` says
    assert (seen[0]["state"], seen[0]["hosts_up"], seen[0]["hosts"], seen[0]["submitted"]) == ("starting", 1, 2, 0)
    assert seen[1]["stop"][0] is True
