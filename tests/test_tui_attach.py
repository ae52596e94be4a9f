"""The dashboard attached to a served coordinator, driven by Textual's Pilot (tui/attach.py).

A local pool runs noop tasks under a `CoordinatorServer` in the test's loop while
`AttachedApp`s attach to its socket, detach, and attach again; the job must not notice.
Waits are on conditions, polled in short pauses that let the app run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from batuta.tui.attach import AttachedApp
from batuta.tui.screens import PickerScreen
from batuta.tui.snapshot import screen_text

from batuta import Pool
from batuta.runtime import serve_wire as w
from batuta.runtime.serve import CoordinatorServer
from batuta.runtime.serve_client import Target

SIZE = (160, 50)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="bt"))  # short: Unix socket paths are limited to 108 bytes
    monkeypatch.setenv("BATUTA_RUNTIME_DIR", str(folder / "batuta"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def until(pilot: object, predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        if pilot is None:
            await asyncio.sleep(0.05)
        else:
            await pilot.pause(0.05)  # type: ignore[attr-defined]


class _Controls:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.cancelled: list[str] = []

    def cancel_job(self, name: str) -> int:
        self.cancelled.append(name)
        return self.pool.cancel_job(name)

    def stop(self) -> None:
        pass


async def test_attach_detach_and_reattach_while_the_job_runs(runtime_dir: Path) -> None:
    pool = Pool.builder().cpu_workers(2).seed(0).build()
    controls = _Controls(pool)
    server = CoordinatorServer(pool, name="live", job="spin", controls=controls, flush_s=0.02)
    await server.start()
    stop = asyncio.Event()
    rounds = 0

    async def work() -> None:
        nonlocal rounds
        with pool.job("spin"):
            while not stop.is_set():
                await pool.map("noop", range(50))
                rounds += 1

    worker: asyncio.Task[None] | None = None
    try:
        await pool.start()
        server.set_state("running")
        server.note(
            w.JobChanged(
                name="spin",
                origin="built-in",
                state="running",
                message="",
                started_at=asyncio.get_running_loop().time(),
                ended_at=None,
            )
        )
        worker = asyncio.create_task(work())
        first = AttachedApp(Target(path=server.path))
        async with first.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: first.snapshots == 1 and first.model.totals.succeeded >= 500, "tasks on screen")
            await until(pilot, lambda: "spin" in screen_text(first), "the job in the jobs panel")
            # nodes and slots from the coordinator (slot views are polled twice a second)
            await until(pilot, lambda: bool(first.model.hosts and first.model.slots), "nodes and slots")
            await pilot.press("x")  # detach
        await _forgotten(server)

        # detached: the job goes on without anyone watching
        finished = server.info()["finished"]
        await until(None, lambda: server.info()["finished"] >= finished + 500, "the job to go on after detach")
        assert not worker.done()

        second = AttachedApp(Target(path=server.path))
        async with second.run_test(size=SIZE) as pilot:
            at_attach = server.info()["finished"]
            # history included: the new view counts what ran before it existed
            await until(
                pilot, lambda: second.model.totals.succeeded >= at_attach, "the history in the re-attached view"
            )
            assert second.model.jobs["spin"].started_at is not None
            assert sum(second.model.throughput.series(second.model.clock())) > 0
            await pilot.press("p")
            await until(pilot, lambda: pool.paused, "pause from the attached view")
            await until(pilot, lambda: second.model.paused, "the view to show the pause")
            await pilot.press("p")
            await until(pilot, lambda: not pool.paused, "resume from the attached view")
            await pilot.press("c")  # a served job is not cancelled by one stray key
            await until(pilot, lambda: isinstance(second.screen, PickerScreen), "the job picker")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(second.screen, PickerScreen), "the picker to close")
            await pilot.press("c")
            await until(pilot, lambda: isinstance(second.screen, PickerScreen), "the job picker again")
            await pilot.press("enter")
            await until(pilot, lambda: controls.cancelled == ["spin"], "cancel from the attached view")
            await pilot.press("n")
            await until(pilot, lambda: isinstance(second.screen, PickerScreen), "the host picker")
            await pilot.press("enter")
            await until(pilot, lambda: second.model.hosts["local"].state in ("draining", "drained"), "the drain")
            # the drained host is offered back: an attached view could drain and never undo it
            await pilot.press("n")
            await until(pilot, lambda: isinstance(second.screen, PickerScreen), "the host picker again")
            await pilot.press("enter")
            await until(pilot, lambda: second.model.hosts["local"].state == "up", "the host to take work again")
            await pilot.press("q")  # quitting an attached view is a detach too
        await _forgotten(server)
    finally:
        stop.set()
        if worker is not None:
            await asyncio.gather(worker, return_exceptions=True)
        await server.close()
        await pool.close()


async def _forgotten(server: CoordinatorServer) -> bool:
    await until(None, lambda: server.viewers() == [], "the coordinator to forget the viewer")
    return True


async def test_attaching_to_nothing_says_so_on_screen(runtime_dir: Path) -> None:
    app = AttachedApp(Target(path=runtime_dir / "nobody.sock"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.ended, "the connection to fail")
        assert app.model.status == "failed"
        assert "no coordinator at" in app.ended and "batuta ps" in app.ended


async def test_two_dashboards_at_once_see_the_same_job(runtime_dir: Path) -> None:
    pool = Pool.builder().cpu_workers(2).seed(0).build()
    server = CoordinatorServer(pool, name="two", job="spin", controls=_Controls(pool), flush_s=0.02)
    await server.start()
    try:
        await pool.start()
        server.set_state("running")
        first, second = AttachedApp(Target(path=server.path)), AttachedApp(Target(path=server.path))
        async with first.run_test(size=SIZE) as pilot1, second.run_test(size=SIZE) as pilot2:
            await until(pilot1, lambda: first.snapshots and second.snapshots, "both snapshots")
            with pool.job("spin"):
                await pool.map("noop", range(600))

            async def sees_the_job(pilot: object, app: AttachedApp) -> None:
                await until(pilot, lambda: app.model.totals.succeeded == 600, "each view to count 600")
                await until(pilot, lambda: "spin" in screen_text(app), "the job on each screen")

            for pilot, app in ((pilot1, first), (pilot2, second)):
                await sees_the_job(pilot, app)
            await pilot2.press("p")  # one view pauses; the other sees it
            await until(pilot1, lambda: first.model.paused, "the other view to show the pause")
            assert len(server.viewers()) == 2
    finally:
        await server.close()
        await pool.close()
