"""Golden-text snapshots of the dashboard, drawn from seeded events at fixed sizes.

Live data cannot give the same screen twice, so these snapshots drive the app with no
pool: the view-model is fed a fixed sequence of events (a seeded synthetic cluster, or a
hand-written small one) under a fixed clock, and the screen's characters are compared
with `tests/snapshots/*.txt`. Text rather than SVG, so that a diff reads like the screen.

To accept a deliberate change: `BATUTA_UPDATE_SNAPSHOTS=1 pytest tests/test_tui_snapshots.py`,
then look at the diff of tests/snapshots/ before committing it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from batuta.tui.app import BatutaApp
from batuta.tui.model import DashboardModel
from batuta.tui.replay import SyntheticCluster, replay
from batuta.tui.screens import TaskDetailScreen
from batuta.tui.snapshot import screen_text
from batuta.tui.widgets import JobsPanel, LogPanel

from batuta import Backend, TaskResult, TaskStatus
from batuta.runtime import events as pe

SNAPSHOTS = Path(__file__).parent / "snapshots"
T0 = 1000.0


@pytest.fixture(autouse=True)
def fixed_log_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log lines show UTC, so the snapshots do not depend on the machine's time zone."""
    monkeypatch.setattr(
        LogPanel, "timestamp", staticmethod(lambda created: time.strftime("%H:%M:%S", time.gmtime(created)))
    )


def check(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("BATUTA_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no snapshot {path}; create it with BATUTA_UPDATE_SNAPSHOTS=1 and review it")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from {path} (BATUTA_UPDATE_SNAPSHOTS=1 to accept)"


def seeded_cluster_model() -> DashboardModel:
    model = DashboardModel(clock=lambda: T0 + 30, cluster_label="replay: 4 hosts")
    cluster = SyntheticCluster(hosts=4, seed=1)
    replay(model.apply, cluster, T0, T0 + 30, 600)
    model.update_slots(cluster.slot_views(T0 + 30))
    model.set_status("running")
    model.job_started("kmeans", "built-in")
    model.job_started("pi", "built-in")
    model.job_ended("pi", "done", "pi ~ 3.141593")
    model.add_log(20, "batuta.tui", "job kmeans started (built-in)", 1_764_300_000.0)
    model.add_log(30, "batuta.runtime.pool", "host node03 lost: no heartbeat for 8.1s (lost after 8s)", 1_764_300_007.0)
    model.add_log(20, "batuta.runtime.pool", "host node03 relaunched (attempt 1)", 1_764_300_008.0)
    model.tick(T0 + 30)
    return model


def small_cluster_model() -> DashboardModel:
    """Three hosts: one with a GPU whose power NVML cannot read, one without GPUs, one lost."""
    now = T0 + 10
    model = DashboardModel(clock=lambda: now, cluster_label="cluster.toml (3 hosts)")
    for name, gpus in (("gpu-a", ("H100",)), ("cpu-b", ()), ("gpu-c", ("H100",))):
        model.apply(
            pe.HostUp(
                host=name,
                slots=(f"{name}/0", f"{name}/1"),
                gpus=gpus,
                cpu_count=32,
                batuta_version="0.1.0",
                python_version="3.11",
                at=T0,
            )
        )
    reading = pe.GpuReading(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        utilization=71.0,
        memory_used=60 * 2**30,
        memory_total=80 * 2**30,
        temperature=64.0,
        power=None,
        cached_values=6,
        cached_bytes=12 * 2**30,
        cache_cap=40 * 2**30,
    )
    for second in range(10):
        at = T0 + second
        readings: tuple[pe.GpuReading, ...]
        for host, cpu, memory, total, readings, why in (
            ("gpu-a", 35.0, 90, 512, (reading,), ""),
            ("cpu-b", 88.0, 20, 64, (), "no NVIDIA driver"),
        ):
            model.apply(
                pe.HostTelemetry(
                    host=host,
                    cpu_percent=cpu,
                    memory_used=memory * 2**30,
                    memory_total=total * 2**30,
                    gpus=readings,
                    gpu_status=why,
                    at=at,
                )
            )
    model.apply(pe.HostDown(host="gpu-c", reason="connection to 10.0.0.13 closed", at=T0 + 6))
    model.set_status("running")
    model.job_started("etl", "/home/me/etl.py")
    for task_id in range(1, 9):
        model.apply(pe.TaskQueued(task_id=task_id, name="transform", backend="cpu", at=T0 + 1, job="etl"))
    for task_id in range(1, 5):
        slot = f"gpu-a/{task_id % 2}"
        model.apply(pe.TaskStarted(task_id=task_id, name="transform", host="gpu-a", slot=slot, attempt=1,
                                   at=T0 + 2, job="etl"))  # fmt: skip
        ended = TaskStatus.FAILED if task_id == 3 else TaskStatus.SUCCEEDED
        result = TaskResult(task_id=task_id, name="transform", status=ended, duration=0.25 * task_id,
                            queue_wait=1.0, host="gpu-a", slot=slot, attempts=1, backend=Backend.CPU, job="etl",
                            error="exited with code 2" if ended is TaskStatus.FAILED else None,
                            stderr=b"etl: bad row 17\n" if ended is TaskStatus.FAILED else b"")  # fmt: skip
        model.apply(pe.TaskFinished(result=result, at=T0 + 2 + 0.25 * task_id))
    model.apply(pe.TaskStarted(task_id=5, name="transform", host="cpu-b", slot="cpu-b/0", attempt=1, at=now - 1.5,
                               job="etl"))  # fmt: skip
    model.add_log(30, "batuta.runtime.pool", "host gpu-c lost: connection to 10.0.0.13 closed", 1_764_300_006.0)
    model.tick(now)
    return model


async def draw(model: DashboardModel, size: tuple[int, int], then: Callable[[BatutaApp], object] | None = None) -> str:
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        app.sync_now()
        await pilot.pause()
        if then is not None:
            then(app)
            await pilot.pause()
            await pilot.pause()
        return screen_text(app)


@pytest.mark.parametrize("size", [(160, 50), (120, 40)], ids=["160x50", "120x40"])
async def test_main_screen(size: tuple[int, int]) -> None:
    check(f"main_{size[0]}x{size[1]}", await draw(seeded_cluster_model(), size))


async def test_panels_drawn_beside_a_scrollbar_are_whole_once_it_goes() -> None:
    """A panel that shows a scrollbar cuts its lines a column short; once the scrollbar goes
    (a transient layout, a terminal resize) the lines must be cut again at the full width (a
    cached line once kept the old width: the last column lost a character, as under CI load)."""
    model = seeded_cluster_model()
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one(JobsPanel)
        for overflow in ("scroll", "auto"):
            panel.styles.overflow_y = overflow
            await pilot.pause()
            app.sync_now()
            await pilot.pause()
        text = screen_text(app)
    check("main_120x40", text)


async def test_small_cluster_with_a_lost_host_and_no_gpu() -> None:
    text = await draw(small_cluster_model(), (120, 40))
    assert "no GPU  no NVIDIA driver" in text and "? W" in text and "○ lost" in text and "cache   12G" in text
    check("small_cluster_120x40", text)


async def test_failed_task_detail() -> None:
    model = small_cluster_model()

    def open_detail(app: BatutaApp) -> None:
        app.push_screen(TaskDetailScreen(model.failures[3]))

    text = await draw(model, (120, 40), open_detail)
    assert "etl: bad row 17" in text
    check("task_detail_120x40", text)
