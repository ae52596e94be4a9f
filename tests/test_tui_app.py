"""The dashboard driven by Textual's Pilot: every interaction, on a replayed or a real pool.

Replayed tests feed the view-model a seeded synthetic cluster (no agents, fixed clock);
real ones start the embedded local agent with `BATUTA_FAKE_GPUS` so GPU rows exist on a
machine without GPUs. Tests wait on conditions (a job's state, a screen's type, a string
on screen), polling with short pauses, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from batuta.tui.app import BatutaApp
from batuta.tui.model import DashboardModel
from batuta.tui.pace import (
    FLOOD_EVENTS_PER_S,
    PACE_WINDOW_S,
    POOL_FLOOD_EVENTS_PER_S,
    SATURATED_REFRESH_HZ,
    RefreshPace,
)
from batuta.tui.replay import SyntheticCluster, replay
from batuta.tui.screens import FailuresScreen, HelpScreen, JobFileScreen, PickerScreen, TaskDetailScreen
from batuta.tui.snapshot import screen_text
from prometheus_client.parser import text_string_to_metric_families
from textual.widgets import Input

from batuta import Backend, Pool, Task, TaskResult, TaskStatus
from batuta.cli import _run as cli_run
from batuta.cli import main as cli_main
from batuta.errors import AgentError
from batuta.runtime.events import HostStateChanged, TaskFinished
from batuta.runtime.session import HostSpec

SIZE = (160, 50)
T0 = 1000.0

FAILING_JOB = """\
from batuta import Task


async def main(pool):
    ok = [await pool.submit(Task.kernel("noop", i)) for i in range(20)]
    bad = await pool.submit(Task.binary("/bin/sh", "-c", "echo 'chunk 7: disk quota exceeded' >&2; exit 3"))
    for future in ok:
        await future
    await bad
    return "20 noops and one failure"
"""


async def until(pilot: object, predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Wait (in short pauses that let the app run) until `predicate()` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await pilot.pause(0.05)  # type: ignore[attr-defined]


def replayed_model(hosts: int = 4, seconds: float = 30.0) -> DashboardModel:
    """A model fed 30 s of a seeded synthetic cluster, ending with one task that failed."""
    model = DashboardModel(clock=lambda: T0 + seconds, cluster_label="replay")
    cluster = SyntheticCluster(hosts=hosts, seed=1)
    replay(model.apply, cluster, T0, T0 + seconds, 600)
    model.update_slots(cluster.slot_views(T0 + seconds))
    model.set_status("running")
    failed = TaskResult(
        task_id=99_999,
        name="vadd",
        status=TaskStatus.FAILED,
        stderr=b"ValueError: shapes differ\n",
        error="ValueError: shapes differ",
        duration=0.002,
        queue_wait=0.001,
        host="node01",
        slot="node01/2",
        attempts=1,
        backend=Backend.GPU,
        job="kmeans",
    )
    model.apply(TaskFinished(result=failed, at=T0 + seconds - 0.01))
    return model


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local agents report two deterministic fake GPUs."""
    monkeypatch.setenv("BATUTA_FAKE_GPUS", "2")


def local_pool(slots: int = 2) -> Pool:
    return Pool.builder().cpu_workers(slots).relaunch(max_relaunches=5, backoff=0.2).seed(0).build()


# -- replayed ---------------------------------------------------------------------------------


async def test_help_screen_opens_and_closes() -> None:
    app = BatutaApp(model=replayed_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        assert "drain a host" in screen_text(app)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help to close")
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help again on f1")


async def test_clicking_a_failed_task_in_the_stream_opens_its_details() -> None:
    model = replayed_model()
    app = BatutaApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        stream = app.query_one("#stream")
        # the nodes panel grows to its rows on its first draw, moving the stream down: wait for it
        await until(pilot, lambda: "#" in screen_text(app) and "└ GPU 1" in screen_text(app), "the first full draw")
        await pilot.pause()
        rows = model.stream(stream.scrollable_content_region.height)
        row = next(index for index, r in enumerate(rows) if r.state == "failed")
        offset = (1 + 4, 1 + row)  # inside the border, on the '#id'

        def link_under_mouse() -> object:
            x, y = stream.region.x + offset[0], stream.region.y + offset[1]
            return app.screen.get_style_at(x, y).meta.get("@click")

        # A click is hit-tested against the last composed frame: one that lands while a
        # relayout is pending can miss, or hit another widget (both seen under load), so a
        # bounded few are allowed; the detail view must open from one of them.
        for _ in range(5):
            await until(pilot, link_under_mouse, "the layout to settle with the link in place")
            if not await pilot.click("#stream", offset=offset):
                continue  # the frame it was tested against had the stream elsewhere
            with contextlib.suppress(AssertionError):
                await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen), "the task detail view", 5.0)
            if isinstance(app.screen, TaskDetailScreen):
                break
        assert isinstance(app.screen, TaskDetailScreen)
        assert app.screen.failed.result.task_id == rows[row].task_id
        text = screen_text(app)
        assert f"Task #{rows[row].task_id}" in text and "stderr" in text and "Attempts" in text


async def test_failures_list_leads_to_details() -> None:
    model = replayed_model()
    app = BatutaApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, FailuresScreen), "the failures list")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen), "the detail of the newest failure")
        assert isinstance(app.screen, TaskDetailScreen)
        assert app.screen.failed.result.task_id == next(reversed(model.failures))
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, TaskDetailScreen), "the detail view to close")


async def test_latency_filter_cycles_by_key_and_by_click() -> None:
    model = replayed_model()
    kernels = model.latency_choices()["kernel"]
    app = BatutaApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("k")
        assert model.latency_filter.kernel == kernels[0]
        await until(pilot, lambda: f"kernel {kernels[0]} ▸" in screen_text(app), "the filter on screen")
        await pilot.click("#latency", offset=(1 + 1 + 8, 1))  # the label after 'kernel '
        assert model.latency_filter.kernel == kernels[1]
        await pilot.press("b")
        assert model.latency_filter.backend == "cpu"
        await pilot.press("o")
        assert model.latency_filter.host == "node01"


async def test_textuals_own_toasts_keep_their_markup() -> None:
    """Toasts shown as plain text (ours) made ctrl+c's read "Press [b]ctrl+q[/b] to quit"."""
    app = BatutaApp(model=replayed_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+c")
        await until(pilot, lambda: app._notifications, "a notification")
        (toast,) = list(app._notifications)
        assert "ctrl+q" in toast.message and toast.markup
        app.toast("saved to [/tmp/out.npy]")
        await until(pilot, lambda: len(app._notifications) == 2, "our toast")
        assert [n.markup for n in app._notifications] == [True, False]


async def test_replay_without_a_pool_refuses_to_run_jobs_politely() -> None:
    app = BatutaApp(model=replayed_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("d")
        await until(pilot, lambda: app._notifications, "a notification")
        assert "replays recorded events" in str(next(iter(app._notifications)).message)
        await pilot.press("p")
        assert app.is_running


# -- a real local pool ------------------------------------------------------------------------


@pytest.mark.usefixtures("fake_gpus")
async def test_demo_starts_from_a_key_shows_running_tasks_and_cancels() -> None:
    app = BatutaApp(local_pool(), cluster_label="local (embedded)")
    async with app.run_test(size=SIZE) as pilot:
        model = app.model
        await until(pilot, lambda: model.status == "running", "the pool to start")
        await until(pilot, lambda: "Fake GPU 1" in screen_text(app), "the fake GPUs on screen")
        assert "▶ scheduling" in screen_text(app)
        await pilot.press("d")
        await until(pilot, lambda: model.jobs.get("demo") and model.jobs["demo"].submitted > 50, "demo tasks")
        await until(pilot, lambda: "▶ #" in screen_text(app), "a running task in the stream")
        await pilot.press("p")  # paused: the demo cannot end on its own while the picker is up
        await until(pilot, lambda: app.pool is not None and app.pool.paused, "the pause")
        await pilot.press("c")  # asks, even with one job running: Esc keeps it
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the job picker")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PickerScreen), "the picker to close")
        assert model.jobs["demo"].state == "running"
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the job picker again")
        await pilot.press("enter")
        await until(pilot, lambda: model.jobs["demo"].state == "cancelled", "the demo to be cancelled")
        await until(pilot, lambda: model.jobs["demo"].running == 0, "its running tasks to end")
        assert model.jobs["demo"].cancelled > 0
        await until(pilot, lambda: "cancelled" in screen_text(app), "the jobs panel to say so")


@pytest.mark.usefixtures("fake_gpus")
async def test_pause_resume_and_drain() -> None:
    pool = local_pool()
    app = BatutaApp(pool)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        await pilot.press("p")
        assert pool.paused
        await until(pilot, lambda: "⏸ paused" in screen_text(app), "the paused banner")
        future = await pool.submit(Task.kernel("noop", 1))
        await pilot.pause(0.3)
        assert not future.done()  # paused: it waits
        await pilot.press("p")
        assert not pool.paused
        await until(pilot, future.done, "the task to run once resumed")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the host picker")
        await pilot.press("enter")
        await until(pilot, lambda: app.model.hosts["local"].state in ("draining", "drained"), "the drain")
        await until(pilot, lambda: "drain" in screen_text(app), "the nodes panel to say so")
        warned = "the last host that takes work: queued tasks wait until it is undrained (n)"
        assert any(warned in str(n.message) for n in app._notifications)
        stuck = await pool.submit(Task.kernel("noop", 2))
        await pilot.pause(0.3)
        assert not stuck.done()  # no host takes work: it waits (it waited for ever, no way back)
        await pilot.press("n")  # the drained host is offered back
        await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the host picker again")
        await pilot.press("enter")
        await until(pilot, stuck.done, "the task to run on the undrained host")
        assert (await stuck).value == 2 and app.model.hosts["local"].state == "up"


@pytest.mark.usefixtures("fake_gpus")
async def test_job_file_from_the_palette_and_its_failure_in_detail(tmp_path: Path) -> None:
    job_file = tmp_path / "flaky_job.py"
    job_file.write_text(FAILING_JOB)
    app = BatutaApp(local_pool())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        await pilot.press("ctrl+p")
        await pilot.press(*"job file")
        await until(pilot, lambda: "Run a job file" in screen_text(app), "the palette's hit")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, JobFileScreen), "the job-file prompt")
        app.screen.query_one(Input).value = str(job_file)  # typing a long tmp path key by key is slow
        await pilot.press("enter")
        jobs = app.model.jobs
        await until(pilot, lambda: jobs.get("flaky_job") and jobs["flaky_job"].state == "done", "the job to finish")
        assert (jobs["flaky_job"].succeeded, jobs["flaky_job"].failed) == (20, 1)
        await until(pilot, lambda: "1 task failed in the last minute" in screen_text(app), "the failure alert")
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, FailuresScreen), "the failures list")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TaskDetailScreen), "the detail view")
        text = screen_text(app)
        assert "chunk 7: disk quota exceeded" in text  # stderr
        assert "exited with code 3" in text and "flaky_job" in text


SHIPPED_JOB = """\
from batuta import Task
import tui_ship_kernels


async def main(pool):
    results = [await pool.run(Task.kernel("tui_ship_probe", i)) for i in range(4)]
    return " ".join(f"{r.status.value}:{r.value}" for r in results)
"""

SHIPPED_KERNELS = """\
from batuta import kernel

VERSION = {version}


@kernel("tui_ship_probe")
def tui_ship_probe(x):
    return x + 100 * VERSION


tui_ship_probe.cpu(tui_ship_probe.reference)
"""


async def test_a_job_file_started_in_the_running_pool_ships_its_modules_and_an_edit_runs_new_code(
    tmp_path: Path,
) -> None:
    """`r` on a job file whose kernels live beside it: the pool (started without them) gets them
    before the job's tasks, and after an edit the next run gets the new code on every slot."""
    job_file = tmp_path / "ship_job.py"
    job_file.write_text(SHIPPED_JOB)
    (tmp_path / "tui_ship_kernels.py").write_text(SHIPPED_KERNELS.format(version=1))
    app = BatutaApp(local_pool())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        jobs = app.model.jobs
        for version, label in ((1, "ship_job"), (2, "ship_job-2")):
            (tmp_path / "tui_ship_kernels.py").write_text(SHIPPED_KERNELS.format(version=version))
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, PickerScreen), "the job picker")
            await pilot.press("end", "enter")  # the last choice: a job file
            await until(pilot, lambda: isinstance(app.screen, JobFileScreen), "the job-file prompt")
            app.screen.query_one(Input).value = str(job_file)
            await pilot.press("enter")

            def finished(label: str = label) -> bool:
                return label in jobs and jobs[label].state == "done"

            await until(pilot, finished, f"{label} to finish", 60)
            expected = " ".join(f"succeeded:{i + 100 * version}" for i in range(4))
            assert jobs[label].message == expected


HOST_ONLY_FAILURE = """\
import sys

from batuta import kernel

# only on the hosts (`python -m batuta.agent`): the job file itself imports it here, in a test
# process that may have imported batuta.agent.agent for other tests
if getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "").startswith("batuta.agent"):
    raise ImportError("tui_host_only needs the lab's licence server")


@kernel("tui_host_probe")
def tui_host_probe(x):
    return x


tui_host_probe.cpu(tui_host_probe.reference)
"""


async def test_a_job_whose_module_fails_to_import_on_a_host_runs_and_the_failure_is_notified(
    tmp_path: Path,
) -> None:
    """The hosts import a job's shipped modules after `ship` returns: the job starts, its task
    of that module's kernel fails, and the host's import error is a notification."""
    job_file = tmp_path / "host_only_job.py"
    job_file.write_text(
        "from batuta import Task\nimport tui_host_only\n\n\nasync def main(pool):\n"
        "    return (await pool.run(Task.kernel('tui_host_probe', 1))).status.value\n"
    )
    (tmp_path / "tui_host_only.py").write_text(HOST_ONLY_FAILURE)
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(job_file))
        jobs = app.model.jobs
        await until(pilot, lambda: "host_only_job" in jobs and jobs["host_only_job"].state == "done", "the job", 60)
        assert jobs["host_only_job"].message == "failed"
        where = tmp_path / "tui_host_only.py"
        expected = f"tui_host_only: ImportError: tui_host_only needs the lab's licence server (at {where}:8)"
        await until(pilot, lambda: any(str(n.message) == expected for n in app._notifications), "the notification")
        (notified,) = [n for n in app._notifications if str(n.message) == expected]
        assert notified.title == "host local cannot import the job's code"


async def test_a_bad_job_file_is_a_notification_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("def main(pool):\n    return 1\n")  # not async
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(bad))
        await until(pilot, lambda: any("not 'async def'" in str(n.message) for n in app._notifications), "the error")
        assert app.is_running and "broken" not in app.model.jobs
        assert any("cannot run job" in line.message and "not 'async def'" in line.message for line in app.model.logs)


@pytest.mark.usefixtures("fake_gpus")
async def test_the_app_keeps_working_when_the_local_agent_dies() -> None:
    pool = local_pool(1)
    app = BatutaApp(pool)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        description = pool.hosts()[0].description
        pid = int(description.rsplit(" ", 1)[-1])  # "local agent pid 1234"
        states: list[str] = []  # every host state the pool announces, in order
        pool.subscribe(lambda event: states.append(event.state) if isinstance(event, HostStateChanged) else None)
        os.kill(pid, signal.SIGKILL)  # the agent this test's pool started
        await until(pilot, lambda: any("lost" in line.message for line in app.model.logs), "the loss in the log")
        await until(pilot, lambda: "up" in states and app.model.hosts["local"].state == "up", "the relaunch")
        await until(pilot, lambda: pool.hosts()[0].description != description, "a new agent")
        result = await pool.run(Task.kernel("noop", 7))
        assert result.value == 7
        await until(pilot, lambda: "● up" in screen_text(app), "the host back up on screen")
        assert app.is_running


@pytest.mark.parametrize("source", ["fake", "system"])
async def test_no_gpu_is_said_when_the_host_has_none(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake telemetry with no GPUs, and this machine's own NVML where there is no driver."""
    if source == "fake":
        monkeypatch.setenv("BATUTA_FAKE_GPUS", "0")
    else:
        if Path("/proc/driver/nvidia").exists():
            pytest.skip("this machine has an NVIDIA driver: NVML is not absent here")
        monkeypatch.delenv("BATUTA_FAKE_GPUS", raising=False)
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        hosts = app.model.hosts
        await until(pilot, lambda: hosts.get("local") and hosts["local"].telemetry_seen, "telemetry")
        await until(pilot, lambda: "no GPU" in screen_text(app), "'no GPU' on screen")
        assert hosts["local"].gpu_status and hosts["local"].gpu_status in screen_text(app)
        assert "● up" in screen_text(app)  # the rest of the host is shown


async def test_a_pool_that_cannot_start_is_reported_on_screen() -> None:
    async def refuse() -> object:
        raise AgentError("host ghost: agent refused the session (test)")

    pool = Pool([HostSpec(name="ghost", launch=refuse)])  # type: ignore[arg-type]
    app = BatutaApp(pool)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "failed", "the failure")
        await until(pilot, lambda: "pool failed to start" in screen_text(app), "the banner")
        await pilot.press("d")  # still usable: says why it cannot run a job (it waited for ever)
        said = "the pool did not start (host ghost: agent refused the session (test)); quit (q) and fix the cluster"
        await until(pilot, lambda: any(said in str(n.message) for n in app._notifications), "why no job runs")
        assert any(said in line.message for line in app.model.logs)  # kept after the toast goes
        assert app.is_running and not app.model.jobs


async def test_a_job_that_raises_leaves_none_of_its_tasks_running(tmp_path: Path) -> None:
    """`batuta run` cancels a failed job's unfinished tasks; the dashboard let them run on,
    its slots busy for a job already over."""
    job = tmp_path / "raises.py"
    job.write_text(
        "from batuta import Task\n\nasync def main(pool):\n"
        "    for _ in range(6):\n        await pool.submit(Task.kernel('spin', 60.0))\n"
        "    raise RuntimeError('the job gives up')\n"
    )
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(job))
        await until(pilot, lambda: "raises" in app.model.jobs and app.model.jobs["raises"].state == "failed", "failed")
        assert app.model.jobs["raises"].message == "RuntimeError: the job gives up (6 unfinished tasks cancelled)"
        await until(pilot, lambda: app.pool is not None and app.pool.stats().cancelled == 6, "its tasks cancelled")


async def test_what_the_pool_holds_is_said_when_the_last_job_ends(tmp_path: Path) -> None:
    """A dashboard on allocations kept their nodes after its jobs ended, until `q`, and
    nothing on screen said so."""
    job = tmp_path / "brief.py"
    job.write_text("async def main(pool):\n    return 'ok'\n")
    app = BatutaApp(local_pool(1), held="the pool holds 2 nodes of allocation gpu")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(job))
        said = "no job is running; the pool holds 2 nodes of allocation gpu until you quit (q)"
        await until(pilot, lambda: any(said in line.message for line in app.model.logs), "what is held")


def test_a_dashboard_on_allocations_knows_what_it_holds() -> None:
    from batuta.cli._run import _held
    from batuta.runtime.allocation_config import allocation_from_options
    from batuta.runtime.cluster import ClusterConfig

    config = allocation_from_options({"kind": "slurm", "name": "gpu", "nodes": 2, "time": "1:00:00"}, {})
    cluster = ClusterConfig(source="t", allocations=(config,))
    assert _held(cluster) == "the pool holds 2 nodes of allocation gpu (its batch job running)"
    assert _held(ClusterConfig(source="t")) == "" and _held(None) == ""


# -- the command line -------------------------------------------------------------------------


def test_cli_tui_refuses_bad_arguments_before_the_screen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["tui", "--job", "no_such_job"]) == 2
    assert "unknown built-in job 'no_such_job'" in capsys.readouterr().err
    assert cli_main(["tui", "--cluster", "x.toml", "--workers", "2"]) == 2
    bad = tmp_path / "cluster.toml"
    bad.write_text('[[hosts]]\nname = "a"\naddress = "127.0.0.1"\nslotz = 2\n')
    assert cli_main(["tui", "--cluster", str(bad)]) == 2
    assert "hosts[0].slotz: unknown key; did you mean 'slots'?" in capsys.readouterr().err


def test_cli_tui_help_names_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["tui", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--cluster FILE" in out and "--job JOB" in out


async def test_what_a_job_prints_lands_in_the_log_panel(tmp_path: Path) -> None:
    chatty = tmp_path / "chatty.py"
    chatty.write_text("async def main(pool):\n    print('k-means check: bit-identical')\n    return 'ok'\n")
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(chatty))
        await until(pilot, lambda: "k-means check: bit-identical" in screen_text(app), "the print in the log panel")
        assert any(line.logger == "print" for line in app.model.logs)
        # a line wider than the panel wraps: its end is on screen too (it was cut at the border)
        logging.getLogger("batuta.pool").warning("a long line %s and its ENDMARK", " ".join(["word"] * 40))
        await until(pilot, lambda: "ENDMARK" in screen_text(app), "the end of a long line")


def test_refresh_slows_while_the_pool_floods_and_recovers() -> None:
    pace = RefreshPace()
    start = time.perf_counter()
    assert pace.frame_due(start, 0)  # a frame at every tick while quiet
    flood = int(FLOOD_EVENTS_PER_S * PACE_WINDOW_S * 2)
    now = start + PACE_WINDOW_S
    assert not pace.frame_due(now, flood)  # measured a flood: the last frame was too recent
    assert pace.saturated
    assert pace.frame_due(start + 1.0 / SATURATED_REFRESH_HZ + 0.01, 0)
    later = start + 3.0  # a quiet window: back to a frame at every tick
    assert pace.frame_due(later, 10) and not pace.saturated
    assert pace.frame_due(later + 0.01, 0)


def test_a_pool_on_the_apps_loop_floods_it_at_a_lower_rate() -> None:
    """Frames drawn at every tick slow a pool of short tasks down; if the flood threshold were a
    rate such a slowed pool stays under, the refresh would never slow (the dashboard's pool took
    the h200's coordinator_throughput_ratio from 1.25 to 0.63). An app with its pool on its loop
    sees a flood at the lower rate; a dashboard fed from elsewhere keeps the higher one."""
    between = (POOL_FLOOD_EVENTS_PER_S + FLOOD_EVENTS_PER_S) / 2
    events = int(between * PACE_WINDOW_S)  # over one window
    with_pool, fed = RefreshPace(POOL_FLOOD_EVENTS_PER_S), RefreshPace()
    start = time.perf_counter()
    assert with_pool.frame_due(start, 0) and fed.frame_due(start, 0)  # the test's thread is idle: never busy
    assert not with_pool.frame_due(start + PACE_WINDOW_S, events) and with_pool.saturated
    assert fed.frame_due(start + PACE_WINDOW_S, events) and not fed.saturated

    pool = Pool.local(2, gpu_workers="none")  # built, never started: the app picks its pace from it
    assert BatutaApp(pool, own_pool=False)._pace.flood_events_per_s == POOL_FLOOD_EVENTS_PER_S
    assert BatutaApp(model=DashboardModel())._pace.flood_events_per_s == FLOOD_EVENTS_PER_S


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_cli_tui_serves_metrics_and_writes_the_log_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`batuta tui --metrics-port P --log-file F`: while the dashboard runs a job, Prometheus
    scrapes its tasks and the job's log lines land in F (and never on the terminal)."""
    port = _free_port()
    log_file = tmp_path / "tui.log"
    scraped: list[str] = []

    def headless_run(app: BatutaApp) -> None:
        async def drive() -> None:
            async with app.run_test(size=SIZE) as pilot:
                demo_done = lambda: "demo" in app.model.jobs and app.model.jobs["demo"].state == "done"  # noqa: E731
                await until(pilot, demo_done, "the demo job to finish")
                url = f"http://127.0.0.1:{port}/metrics"
                assert any(f"serving metrics at {url}" in line.message for line in app.model.logs)
                body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
                scraped.append(body.decode())

        asyncio.run(drive())

    monkeypatch.setattr(BatutaApp, "run", headless_run)
    monkeypatch.setattr(cli_run, "has_terminal", lambda: True)
    argv = ["tui", "--workers", "1", "--job", "demo", "--metrics-port", str(port)]
    assert cli_main([*argv, "--log-file", str(log_file), "--log-level", "info", "--log-format", "json"]) == 0
    families = {f.name: f.samples for f in text_string_to_metric_families(scraped[0])}
    succeeded = [s for s in families["batuta_tasks"] if s.labels.get("outcome") == "succeeded"]
    assert sum(s.value for s in succeeded) > 0
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any("job demo finished" in line["message"] for line in lines)


def test_cli_tui_refuses_an_unusable_log_file_or_metrics_port(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli_main(["tui", "--workers", "1", "--log-file", str(tmp_path / "no" / "such" / "dir.log")]) == 2
    assert "cannot open log file" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli_main(["tui", "--workers", "1", "--metrics-port", str(busy.getsockname()[1])]) == 2
    assert "pick another --metrics-port" in capsys.readouterr().err
    assert cli_main(["tui", "--workers", "1", "--metrics-bind", "0.0.0.0"]) == 2
    assert "--metrics-bind 0.0.0.0 needs --metrics-port PORT" in capsys.readouterr().err


def test_cli_tui_without_a_terminal_says_so_instead_of_drawing_into_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_run, "has_terminal", lambda: False)
    monkeypatch.setattr(BatutaApp, "run", lambda app: pytest.fail("the app must not start"))
    assert cli_main(["tui", "--workers", "1"]) == 2
    assert "batuta tui needs a terminal" in capsys.readouterr().err


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_cli_tui_on_a_terminal_that_draws_no_screen_says_so_in_one_line(
    term: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under TERM=dumb (Emacs' shell, a CI log view) the dashboard drew pages of escape codes."""
    monkeypatch.setattr(cli_run, "has_terminal", lambda: True)
    monkeypatch.setenv("TERM", term)
    monkeypatch.setattr(BatutaApp, "run", lambda app: pytest.fail("the app must not start"))
    assert cli_main(["tui", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"TERM={term} says this one does not" in err and "batuta run JOB" in err and "\n" not in err


# The summary's "▶" (the pool scheduling): alone on a narrow terminal, "▶ scheduling" on a wide
# one. Waiting for the word ran these tests to their 60 s bound on an 80-column pty.
SCHEDULING = "▶".encode()


def test_sigterm_quits_the_dashboard_as_q_does_and_gives_the_terminal_back() -> None:
    """`kill PID` left the terminal raw (no echo, no line editing) and on the alternate
    screen, for the user to `reset`; now the app quits as on `q`: exit 0, the screen and the
    terminal's modes restored, the local agent stopped."""
    import subprocess
    import sys
    import termios

    import psutil

    from tests.support.terminal import read_pty

    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("NO_COLOR", None)
    with read_pty() as (slave, chunks):
        before = termios.tcgetattr(slave)
        app = subprocess.Popen(
            [sys.executable, "-m", "batuta", "tui", "-w", "1"], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        try:
            me = psutil.Process(app.pid)
            agents: list[psutil.Process] = []
            for _ in range(600):  # bounded: 60 s for the pool to be up
                agents = [p for p in me.children(recursive=True) if "batuta.agent" in " ".join(p.cmdline())]
                if agents and SCHEDULING in b"".join(chunks):
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    app.wait(0.1)
                assert app.returncode is None, b"".join(chunks)[-2000:]
            assert agents, "the dashboard started no agent"
            app.send_signal(signal.SIGTERM)
            assert app.wait(60) == 0
            after = termios.tcgetattr(slave)
        finally:
            if app.poll() is None:
                app.kill()
    drawn = b"".join(chunks)
    assert drawn.rfind(b"\x1b[?1049l") > drawn.rfind(b"\x1b[?1049h") >= 0  # left the alternate screen
    assert after[3] == before[3]  # lflag: echo and line editing back
    _, alive = psutil.wait_procs(agents, timeout=30)
    assert not alive


@pytest.mark.parametrize("how", ["hung-up", "hung-up-and-sighup"])
def test_the_dashboard_ends_when_its_terminal_goes_away(how: str) -> None:
    """Its terminal gone with no SIGHUP to it (a killed tmux signals the shell): Textual's
    input thread read EOF at full speed, its writer thread died on EIO, and the app then blocked
    writing: `batuta tui` spun at ~85% CPU for good, its agent running, SIGTERM unheard. Now it
    quits as on SIGHUP: exit 130, the agent stopped."""
    import subprocess
    import sys

    import psutil

    from tests.support.terminal import Terminal

    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("NO_COLOR", None)
    terminal = Terminal()
    try:
        slave = terminal.slave
        app = subprocess.Popen(
            [sys.executable, "-m", "batuta", "tui", "-w", "1"], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        try:
            me = psutil.Process(app.pid)
            agents: list[psutil.Process] = []
            for _ in range(600):  # bounded: 60 s for the pool to be up
                agents = [p for p in me.children(recursive=True) if "batuta.agent" in " ".join(p.cmdline())]
                if agents and SCHEDULING in terminal.output():
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    app.wait(0.1)
                assert app.returncode is None, terminal.output()[-2000:]
            assert agents, "the dashboard started no agent"
            terminal.hang_up()
            if how == "hung-up-and-sighup":  # as the kernel does to a terminal's foreground processes
                app.send_signal(signal.SIGHUP)
            assert app.wait(60) == 130
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
    finally:
        terminal.close()
    _, alive = psutil.wait_procs(agents, timeout=30)
    assert not alive


def test_text_with_square_brackets_is_shown_as_it_is(tmp_path: Path) -> None:
    """A job's value '[/tmp/out.npy]' was read as Rich markup by its toast: MarkupError ended the
    dashboard, and the jobs beside it, with exit code 0 (on a terminal: Pilot's screen did not
    draw that toast)."""
    import subprocess
    import sys

    import psutil

    from tests.support.terminal import read_pty

    job = tmp_path / "returns_a_path.py"
    job.write_text('async def main(pool):\n    return "results saved to [/tmp/out.npy]"\n')
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("NO_COLOR", None)
    with read_pty() as (slave, chunks):
        app = subprocess.Popen(
            [sys.executable, "-m", "batuta", "tui", "-w", "1", "--job", str(job)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        try:
            me = psutil.Process(app.pid)
            for _ in range(600):  # bounded: 60 s for the job's toast
                if b"out.npy" in b"".join(chunks) or app.poll() is not None:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    app.wait(0.1)
            drawn = b"".join(chunks)
            assert app.poll() is None and b"MarkupError" not in drawn, drawn[-2000:]
            agents = me.children(recursive=True)
            app.send_signal(signal.SIGTERM)
            assert app.wait(60) == 0
        finally:
            if app.poll() is None:
                app.kill()
    psutil.wait_procs(agents, timeout=30)


async def test_the_host_start_up_waits_for_is_on_screen_while_it_waits() -> None:
    """Only the hosts that were up showed ('2/2 up'): the one start-up waited for was nowhere."""
    import math
    from dataclasses import replace

    from batuta.runtime.pool import PoolConfig, local_host
    from batuta.transport.base import ByteStream

    gate = asyncio.Event()
    slow = local_host(1, gpus="none", name="slow")

    async def launch() -> ByteStream:
        await gate.wait()
        return await slow.launch()

    specs = [local_host(1, gpus="none", name="quick"), replace(slow, launch=launch)]
    app = BatutaApp(Pool(specs, PoolConfig(start_wait=math.inf)))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.hosts.get("quick") and app.model.hosts["quick"].state == "up", "quick up")
        assert app.model.hosts["slow"].state == "starting" and app.model.status == "starting"
        await until(pilot, lambda: "slow" in screen_text(app), "the waited-for host on screen")
        gate.set()
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        await until(pilot, lambda: app.model.hosts["slow"].state == "up", "slow up")
